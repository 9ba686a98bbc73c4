"""Load with live document edits, through the CLI server.

`memory3 serve --store kb=banks/wiki --writable` runs as a subprocess from another working
directory, with the bank given by a relative path, as a user would start it. For `--seconds`
(60), and on until the last edit is acknowledged, twelve closed-loop chat clients ask greedy
questions in memory mode, each sending its next request when the last is answered, while one
editor client POSTs 20 invented documents (4 POSTs of 5) and DELETEs 10 documents (6 of the
bank's articles, 4 of the just-added ones), planned evenly over `--seconds`, each sent when the
one before is acknowledged. The server runs document operations between generation batches, so
under load an edit waits for batches and the run can outlast `--seconds`: every edit happens
under load. A question quotes the first sentence of the document it is about, so the retriever
ranks that document first whenever the bank holds it.

Checks (exit 1 if one fails):
- no response with status ≥ 500 (nor a failed connection), and every edit acknowledged (201, 200);
- read your writes: every question about an added document, sent after its POST was acknowledged
  and answered before any DELETE of it was sent, retrieved it;
- a deleted document is never among the references of a response whose request was sent after
  its DELETE was acknowledged;
- after the load: a question quoting each added (kept) document retrieves it, one quoting each
  deleted document does not; GET finds each kept document with its text and 404s each deleted one;
  the bank lists exactly the documents it should;
- the server stops cleanly (no traceback in its log), `memory3 store verify` says ok, and a fresh
  read-only server answers the same probes (nothing lost across the restart).

The bank is the first `--limit` bundled Wikipedia summaries, written to a JSONL file with ids
without '/', because `memory3 build wikipedia` names documents "wikipedia/<title>" and the
server's /v1/documents/{id} routes cannot address an id holding '/'. `--bank DIR` reuses a bank
(copied first, so the run never changes it).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_serve_live.py [--bank DIR] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
from harness import Run, experiment, run_experiment

from memory3.eval.report import table
from memory3.shipped import TRAINED

CLI = Path(sys.executable).parent / "memory3"

# Twenty invented facts: nothing in the model's training or the bank knows them.
FACTS = [
    ("Brimwick Harbour", "Brimwick Harbour is a port on the Amber Coast whose purple lighthouse was built in 1872 by the engineer Olwen Tasker."),
    ("Quellmar Observatory", "The Quellmar Observatory stands on Mount Fessary and found the comet Ilvane in 1931 with a brass telescope called Old Moth."),
    ("Tarrowind Festival", "The Tarrowind Festival is held every October in the village of Dunsk, where bakers race wheelbarrows full of rye loaves."),
    ("Corvale Treaty", "The Corvale Treaty of 1604 ended the Salt War between the duchies of Arnholt and Vessery and fixed their border on the river Plim."),
    ("Mirelight Opera", "Mirelight is an opera in three acts by the composer Hester Vaunce, first sung in Lisk in 1899, about a lamplighter who loves the moon."),
    ("Saltwhistle Railway", "The Saltwhistle Railway runs 41 kilometres from Orrin to Cape Dallow and is worked by a single green engine named Perpetua."),
    ("Ostrava Greenfinch", "The Ostrava greenfinch is a songbird of the Pellan marshes that nests only in hollow reeds and sings at night in February."),
    ("Vantry Glass", "Vantry glass is a blue glass made on the island of Vantry since 1420, coloured with crushed snail shells from the Tesk shallows."),
    ("Halloway Bridge", "Halloway Bridge crosses the Grell gorge on nine granite arches; the mason Petra Quill finished it in 1788 after eleven years of work."),
    ("Drummond Fenwick", "Drummond Fenwick was a cartographer from Kellsbay who in 1702 drew the first map of the Ulmer Archipelago, naming 212 islands."),
    ("Sorrel Cup", "The Sorrel Cup is a rowing race between the towns of Ambry and Cosk, first rowed in 1823 over four miles of the river Tane."),
    ("Nimbus Clockworks", "Nimbus Clockworks is a workshop in Farrowgate that has made tower clocks since 1650; its largest clock has a dial of nine metres."),
    ("Lake Orlaith", "Lake Orlaith is a crater lake in the Sarn highlands, 312 metres deep, whose water stays at four degrees all year round."),
    ("Pellucid Script", "The Pellucid script is an alphabet of 23 letters invented by the monk Aldric of Wenn around 980 to write the Ossel language."),
    ("Gannet Rock Lighthouse", "Gannet Rock Lighthouse was lit in 1851 on a reef off Port Ysolde; its keeper Mabel Corran kept the light for forty-two years."),
    ("Thistledown Academy", "Thistledown Academy is a school of weaving in Brannock founded in 1767 by the widow Agnes Merrow with six looms."),
    ("Kestrel Pass", "Kestrel Pass crosses the Hallan range at 2,914 metres and is open only from June to September, when shepherds drive sheep over it."),
    ("Amberly Codex", "The Amberly Codex is a herbal of 140 painted leaves written in Sollin in 1388, kept today in the library of Castle Rook."),
    ("Wrenfield Cider", "Wrenfield cider is pressed from the small red Ferrow apple in the valley of Wrenfield and aged for two winters in oak casks."),
    ("Isle of Tamsk", "The Isle of Tamsk has 340 inhabitants, no cars and one post office; its ferry to the mainland sails twice a week from Sealhaven."),
]  # fmt: skip


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass
class Doc:
    id: str
    title: str
    text: str
    added: bool = False  # one of the invented documents the editor POSTs
    post_ack: float | None = None  # when its POST was acknowledged
    delete_sent: float | None = None
    delete_ack: float | None = None


def question(doc: Doc) -> str:
    """A question that quotes the document's first sentence, so retrieval ranks it first."""
    first = re.split(r"(?<=[.!?])\s", doc.text, maxsplit=1)[0][:240]
    return f"{first} What else is known about {doc.title}?"


# -- the bank and the server ------------------------------------------------------------------------
def build_bank(workdir: Path, limit: int, model: str) -> str:
    """Write the first `limit` bundled articles to JSONL and `memory3 build` them (cwd `workdir`);
    returns the bank's path relative to `workdir`."""
    from memory3.data.wikipedia import iter_articles

    lines = []
    for a in list(iter_articles())[:limit]:
        lines.append(json.dumps({"id": f"wiki-{slug(a.title)}", "title": a.title, "text": a.text}))
    (workdir / "articles.jsonl").write_text("\n".join(lines) + "\n")
    cmd = [str(CLI), "build", "articles.jsonl", "--out", "banks/wiki", "--model", model, "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    print(f"built banks/wiki ({limit} articles) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return "banks/wiki"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`memory3 serve` as a subprocess, its log in a file."""

    def __init__(self, cwd: Path, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.argv = ["memory3", "serve", *args, "--port", str(self.port)]
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen([str(CLI), *self.argv[1:]], cwd=cwd, stdout=f, stderr=f)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server was not ready in {timeout} s")

    def stop(self) -> dict:
        """SIGTERM (uvicorn's graceful shutdown); a clean stop logs no traceback."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        log = self.log.read_text()
        return {
            "exit": rc,
            "clean": rc in (0, -signal.SIGTERM) and "Traceback" not in log and "shutdown complete" in log,
            "tracebacks": log.count("Traceback"),
            "5xx in access log": len(re.findall(r'HTTP/1\.1" 5\d\d', log)),
        }


# -- the load ---------------------------------------------------------------------------------------
@dataclass
class Load:
    url: str
    model: str
    max_tokens: int
    targets: list[Doc]
    t0: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    n: int = 0
    rows: list[dict] = field(default_factory=list)
    edits: list[dict] = field(default_factory=list)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def ask(self, c: httpx.Client, doc: Doc) -> dict:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": question(doc)}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "memory": {"mode": "memory", "store": "kb"},
        }
        row: dict = {"about": doc.id, "sent": self.now()}
        try:
            r = c.post("/v1/chat/completions", json=body)
            row["status"] = r.status_code
            if r.status_code == 200:
                out = r.json()
                row["refs"] = sorted({x["doc_id"] for x in out["choices"][0]["references"]})
                row["tokens"] = out["usage"]["completion_tokens"]
            else:
                row["error"] = r.text[:300]
        except httpx.HTTPError as e:
            row["status"], row["error"] = None, f"{type(e).__name__}: {e}"
        row["received"] = self.now()
        return row

    def client(self, seconds: float, editing: threading.Event) -> None:
        """Ask until `seconds` have passed and the editor is done: every edit happens under load."""
        with httpx.Client(base_url=self.url, timeout=600) as c:
            while self.now() < seconds or editing.is_set():
                with self.lock:
                    doc, self.n = self.targets[self.n % len(self.targets)], self.n + 1
                row = self.ask(c, doc)
                with self.lock:
                    self.rows.append(row)

    def edit(self, c: httpx.Client, at: float, method: str, docs: list[Doc]) -> None:
        time.sleep(max(0.0, at - self.now()))
        sent = self.now()
        if method == "DELETE":
            docs[0].delete_sent = sent
        try:
            if method == "POST":
                body = {"documents": [{"id": d.id, "title": d.title, "text": d.text} for d in docs]}
                r = c.post("/v1/documents", json=body)
            else:
                r = c.delete(f"/v1/documents/{quote(docs[0].id, safe='')}")
            status, error = r.status_code, r.text[:300]
        except httpx.HTTPError as e:
            status, error = None, f"{type(e).__name__}: {e}"
        ok = status == (201 if method == "POST" else 200)
        ack = self.now()
        for d in docs:
            if ok and method == "POST":
                d.post_ack = ack
            elif ok:
                d.delete_ack = ack
        self.edits.append(
            {"op": method, "docs": [d.id for d in docs], "at": at, "sent": sent, "ack": ack,
             "status": status, **({} if ok else {"error": error})}
        )  # fmt: skip


def edit_plan(originals: list[Doc], added: list[Doc], seconds: float) -> list[tuple[float, str, list[Doc]]]:
    """4 POSTs of 5 new documents and 10 DELETEs (6 of the bank's, 4 just added), spread over the run."""
    posts = [("POST", added[i : i + 5]) for i in range(0, 20, 5)]
    dels = [("DELETE", [d]) for d in originals[:6]] + [("DELETE", [added[i]]) for i in (0, 5, 10, 15)]
    order = [
        posts[0], dels[0], dels[1], posts[1], dels[6], dels[2], posts[2],
        dels[7], dels[3], posts[3], dels[8], dels[4], dels[9], dels[5],
    ]  # fmt: skip
    step = seconds * 0.93 / len(order)
    return [(0.05 * seconds + i * step, m, d) for i, (m, d) in enumerate(order)]


def run_load(load: Load, plan: list, clients: int, seconds: float) -> float:
    editing = threading.Event()
    editing.set()
    threads = [threading.Thread(target=load.client, args=(seconds, editing)) for _ in range(clients)]

    def editor() -> None:
        try:
            with httpx.Client(base_url=load.url, timeout=600) as c:
                for at, method, docs in plan:
                    load.edit(c, at, method, docs)
        finally:
            editing.clear()

    ed = threading.Thread(target=editor)
    load.t0 = time.monotonic()
    for t in [*threads, ed]:
        t.start()
    for t in [*threads, ed]:
        t.join()
    return load.now()


# -- the checks -------------------------------------------------------------------------------------
def check_load(load: Load, docs: dict[str, Doc]) -> dict:
    rows = load.rows
    bad = [r for r in rows if r["status"] is None or r["status"] >= 500]
    edits_ok = all(e["status"] in (200, 201) for e in load.edits)  # 201 for a POST, 200 a DELETE
    # read your writes: asked after the POST's ack, answered before a DELETE of it was sent
    ryw = [
        r for r in rows
        if docs[r["about"]].added and r.get("refs") is not None
        and docs[r["about"]].post_ack is not None and r["sent"] > docs[r["about"]].post_ack
        and (docs[r["about"]].delete_sent is None or r["received"] < docs[r["about"]].delete_sent)
    ]  # fmt: skip
    ryw_missed = [r for r in ryw if r["about"] not in r["refs"]]
    gone = [d for d in docs.values() if d.delete_ack is not None]
    after = [(r, d.id) for d in gone for r in rows if r["sent"] > d.delete_ack and d.id in r.get("refs", [])]
    asked_after = sum(1 for d in gone for r in rows if r["about"] == d.id and r["sent"] > d.delete_ack)
    # the other side of the coin: while a deleted document was there, questions found it
    before = [r for d in gone for r in rows if r["about"] == d.id and r.get("refs") is not None
              and r["received"] < (d.delete_sent or 0) and (not d.added or r["sent"] > (d.post_ack or 1e9))]  # fmt: skip
    return {
        "no 5xx or failed connection": {"ok": not bad, "count": len(bad), "examples": bad[:3]},
        "every edit acknowledged": {
            "ok": edits_ok and len(load.edits) == 14,
            "edits": len(load.edits),
            "statuses": ", ".join(sorted({str(e["status"]) for e in load.edits})),
        },
        "added documents read back during the load": {
            "ok": bool(ryw) and not ryw_missed,
            "questions": len(ryw),
            "missed": len(ryw_missed),
            "examples": ryw_missed[:3],
        },
        "deleted documents never read after the DELETE's ack": {
            "ok": not after,
            "responses sent after a DELETE's ack that read the document": len(after),
            "questions about a deleted document sent after its DELETE's ack": asked_after,
            "examples": [r | {"deleted": i} for r, i in after[:3]],
        },
        "questions about a to-be-deleted document that found it, before its DELETE": (
            f"{sum(r['about'] in r['refs'] for r in before)} of {len(before)}"
        ),
    }


def probe(url: str, model: str, max_tokens: int, docs: dict[str, Doc], expected: set[str]) -> dict:
    """After the load: a question about each edited document, a GET of each, the document list."""
    load = Load(url, model, max_tokens, [])
    edited = [d for d in docs.values() if d.added or d.delete_ack is not None]
    kept = [d for d in edited if d.delete_ack is None]
    with httpx.Client(base_url=url, timeout=600) as c:
        asked = {d.id: load.ask(c, d) for d in edited}
        got = {d.id: c.get(f"/v1/documents/{quote(d.id, safe='')}") for d in edited}
        listed = {x["id"] for x in c.get("/v1/documents", params={"limit": 1000}).json()["data"]}
    not_found = [d.id for d in kept if d.id not in asked[d.id].get("refs", [])]
    still_found = [d.id for d in edited if d.delete_ack and d.id in asked[d.id].get("refs", [d.id])]

    def got_right(d: Doc) -> bool:
        r = got[d.id]
        if d.delete_ack is not None:
            return r.status_code == 404
        return r.status_code == 200 and r.json()["text"] == d.text

    get_bad = [d.id for d in edited if not got_right(d)]
    return {
        "every kept added document retrieved": {"ok": not not_found, "of": len(kept), "missed": not_found},
        "no deleted document retrieved": {
            "ok": not still_found,
            "of": len(edited) - len(kept),
            "found": still_found,
        },
        "GET: kept ones with their text, deleted ones 404": {"ok": not get_bad, "bad": get_bad},
        "the bank lists what it should": {
            "ok": listed == expected,
            "documents": len(listed),
            "expected": len(expected),
            "missing": sorted(expected - listed),
            "extra": sorted(listed - expected),
        },
        "every probe answered (200)": {
            "ok": all(r["status"] == 200 for r in asked.values()),
            "statuses": sorted({str(r["status"]) for r in asked.values()}),
        },
    }


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))] if xs else float("nan")


def summary(load: Load, wall: float) -> dict:
    done = [r for r in load.rows if r["status"] == 200]
    lat = [r["received"] - r["sent"] for r in done]
    statuses: dict[str, int] = {}
    for r in load.rows:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    out = {
        "requests": len(load.rows),
        "seconds": wall,
        "requests/s": len(done) / wall,
        "tokens/s": sum(r["tokens"] for r in done) / wall,
        "p50 s": percentile(lat, 50),
        "p99 s": percentile(lat, 99),
        "max s": max(lat, default=float("nan")),
        "statuses": statuses,
    }
    for op in ("POST", "DELETE"):
        t = [e["ack"] - e["sent"] for e in load.edits if e["op"] == op]
        out[f"{op} p50 s"], out[f"{op} max s"] = percentile(t, 50), max(t, default=float("nan"))
    return out


def verify(workdir: Path, bank: str) -> dict:
    p = subprocess.run([str(CLI), "store", "verify", bank], cwd=workdir, capture_output=True, text=True)
    try:
        report = json.loads(p.stdout)
    except json.JSONDecodeError:
        report = {"stdout": p.stdout[-500:], "stderr": p.stderr[-500:]}
    return {"ok": p.returncode == 0 and report.get("ok") is True, "exit": p.returncode, "report": report}


def documents(url: str) -> list[Doc]:
    data = httpx.get(url + "/v1/documents", params={"limit": 1000}, timeout=60).json()["data"]
    return [Doc(d["id"], d["title"], d["text"]) for d in sorted(data, key=lambda d: d["id"])]


def serve_args(args: argparse.Namespace, bank: str, writable: bool) -> list[str]:
    return [
        "--store", f"kb={bank}", *(["--writable"] if writable else []), "--model", args.model,
        "--max-batch-size", str(args.max_batch_size), "--request-timeout", str(args.request_timeout),
    ]  # fmt: skip


def measure(args: argparse.Namespace, workdir: Path, bank: str) -> dict:
    """The load on a writable server, the probes, verify, and the probes again on a fresh server."""
    server = Server(workdir, serve_args(args, bank, writable=True), workdir / "serve.log")
    results: dict = {"server": " ".join(server.argv), "startup s": server.wait_ready()}
    model = httpx.get(server.url + "/v1/models", timeout=60).json()["data"][0]["id"]
    originals = documents(server.url)
    results["bank documents"] = len(originals)
    added = [Doc(f"live-{slug(t)}", t, text, added=True) for t, text in FACTS]
    doomed = originals[:: max(1, len(originals) // 6)][:6]
    others = [d for d in originals if d not in doomed][:: max(1, len(originals) // 6)][:6]
    docs = {d.id: d for d in originals + added}
    load = Load(server.url, model, args.max_tokens, doomed + added + others)
    with httpx.Client(base_url=server.url, timeout=600) as c:
        load.ask(c, others[0])  # warm up
    plan = edit_plan(doomed, added, args.seconds)
    wall = run_load(load, plan, args.clients, args.seconds)
    results["load"] = summary(load, wall)
    print(json.dumps(results["load"]), file=sys.stderr)
    results["checks during the load"] = check_load(load, docs)
    expected = {d.id for d in docs.values() if (not d.added or d.post_ack) and d.delete_ack is None}
    results["checks after the load"] = probe(server.url, model, args.max_tokens, docs, expected)
    results["server stop"] = server.stop()
    results["store verify"] = verify(workdir, bank)
    again = Server(workdir, serve_args(args, bank, writable=False), workdir / "serve-readonly.log")
    again.wait_ready()
    results["checks after a restart (read-only)"] = probe(again.url, model, args.max_tokens, docs, expected)
    results["restarted server stop"] = again.stop()
    results["edits"] = load.edits
    results["requests"] = load.rows
    results["targets"] = {
        "deleted originals": [d.id for d in doomed],
        "other originals": [d.id for d in others],
    }
    return results


def failed(results: dict) -> list[str]:
    out = []
    for group in ("checks during the load", "checks after the load", "checks after a restart (read-only)"):
        out += [f"{group}: {k}" for k, v in results[group].items() if isinstance(v, dict) and not v["ok"]]
    for k in ("server stop", "restarted server stop"):
        if not results[k]["clean"]:
            out.append(f"{k}: not clean")
    if not results["store verify"]["ok"]:
        out.append("store verify")
    return out


def check_lines(checks: dict) -> list[str]:
    lines = []
    for k, v in checks.items():
        if not isinstance(v, dict):
            lines.append(f"- {k}: {v}")
            continue
        extra = {x: y for x, y in v.items() if x not in ("ok", "examples") and not isinstance(y, list)}
        detail = ", ".join(f"{x} {y}" for x, y in extra.items())
        lines.append(f"- {'ok' if v['ok'] else '**FAILED**'}: {k}" + (f" ({detail})" if detail else ""))
    return lines


def report_md(args: argparse.Namespace, r: dict, bad: list[str]) -> str:
    load = r["load"]
    row = {k: load[k] for k in ("requests", "seconds", "requests/s", "tokens/s", "p50 s", "p99 s", "max s")}
    row["statuses"] = ", ".join(f"{k}: {v}" for k, v in sorted(load["statuses"].items()))
    edits = [
        {"edit": f"{e['op']} " + (e["docs"][0] if len(e["docs"]) == 1 else f"{len(e['docs'])} documents")}
        | {k: round(e[k], 1) for k in ("at", "sent", "ack")}
        | {"status": e["status"]}
        for e in r["edits"]
    ]
    stop, ver = r["server stop"], r["store verify"]
    ok = lambda b: "ok" if b else "**FAILED**"  # noqa: E731
    stopped = [
        f"- {ok(stop['clean'])}: the server stopped cleanly (SIGTERM, exit {stop['exit']}, "
        f"{stop['tracebacks']} tracebacks in its log)",
        f"- {ok(ver['ok'])}: `memory3 store verify banks/wiki` afterwards (exit {ver['exit']})",
    ]
    return (
        f"`{r['server']}`, started by the script in the bank's parent directory (a relative "
        f"`--store` path; ready in {r['startup s']:.0f} s) with the shipped `{args.model}` "
        f"(float32) and a bank of {r['bank documents']} bundled Wikipedia summaries. For {args.seconds:g} s, "
        f"and on until the last edit is acknowledged, {args.clients} closed-loop chat clients ask greedy "
        f"questions in memory mode (`max_tokens` {args.max_tokens}, k = 5), each quoting the first sentence "
        f"of one of 32 documents (6 of the bank's that get deleted, the 20 invented ones that get added, "
        f"6 others). Meanwhile one editor client POSTs 20 invented documents (4 POSTs of 5) and DELETEs 10 "
        f"(6 of the bank's, 4 just added), one edit planned every {args.seconds * 0.93 / 14:.1f} s, each "
        f"sent when the one before is acknowledged. Machine: {r['machine']['platform']}, "
        f"{os.cpu_count()} CPU cores shared with other work, no GPU; {r['machine']['date']}.\n\n"
        + table([row])
        + "\n\nThe edits (seconds from the start of the load):\n\n"
        + table(edits, ["edit", "at", "sent", "ack", "status"])
        + f"\n\nHow edits fit under load: the server runs a document operation on its scheduler thread "
        f"between two decoding steps of the running batch (or between batches). A DELETE is one "
        f"operation; a POST of 5 documents is two (the first checks the ids, begins the batch and "
        f"writes 4 documents, the last writes the fifth and commits). A DELETE took "
        f"{load['DELETE p50 s']:.1f} s (median) and a POST {load['POST p50 s']:.1f} s, and the run "
        f"lasted {load['seconds']:.0f} s: {args.seconds:g} s of load, then the wait for the last edit."
        + "\n\nDuring the load:\n\n"
        + "\n".join(check_lines(r["checks during the load"]))
        + "\n\nAfter the load, on the same server, then stopping it:\n\n"
        + "\n".join(check_lines(r["checks after the load"]) + stopped)
        + "\n\nAfter a restart (a read-only server on the same bank):\n\n"
        + "\n".join(check_lines(r["checks after a restart (read-only)"]))
        + ("\n\nFailed: " + "; ".join(bad) if bad else "\n\nAll checks passed.")
        + "\n"
    )


def arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--bank", default=None, help="reuse this bank (copied first); default: build one")
    ap.add_argument("--limit", type=int, default=100, help="articles in the bank it builds")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=12)
    ap.add_argument("--request-timeout", type=float, default=300.0, help="the server's, in seconds")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (bank and server logs)")


@experiment("serve-live", "serve-live-edits.json", arguments, model=TRAINED, threads=None)
def main(run: Run) -> int:
    args = run.args
    workdir = Path(tempfile.mkdtemp(prefix="memory3-live-"))
    try:
        if args.bank:
            shutil.copytree(args.bank, workdir / "banks" / "wiki")
            bank = "banks/wiki"
        else:
            bank = build_bank(workdir, args.limit, args.model)
        results = {"model": args.model}
        results |= {k: getattr(args, k) for k in ("seconds", "clients", "max_tokens", "max_batch_size")}
        results |= measure(args, workdir, bank)
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    bad = failed(results)
    results["failed"] = bad
    run.save(results)
    cmd = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_serve_live.py" + (
        f" --bank {args.bank}" if args.bank else ""
    )
    title = "Server: load with live document edits"
    run.section("serve-live-edits", title, "", report_md(args, run.saved, bad), command=cmd)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(run_experiment("serve-live"))
