"""A real Python gRPC client of `pymedic agent` (grpcio), with code generated
from proto/ at start-up by grpc_tools.protoc, exactly as a user would.

    grpc_client.py --addr HOST:PORT [--token T] scenario --pid PID [--pid PID...]

`scenario`: watches findings from sequence 0 in a background thread, waits
until ListFindings shows a deadlock for every pid, checks the watch stream
delivered an OPENED event for each, fetches each with GetFinding, triggers a
`dump` capture of each and downloads it through GetCapture, then prints one
JSON summary on stdout. Exits non-zero (with a message) on any failure.
"""
import argparse
import importlib.resources
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]


def generate(out: Path):
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto/pymedic/v1").glob("*.proto"))
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{well_known}",
                      f"--python_out={out}", f"--grpc_python_out={out}", *protos])
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, str(out))


def fail(msg):
    print(json.dumps({"ok": False, "error": msg}))
    sys.exit(1)


def scenario(stub, pb, meta, pids, timeout):
    from google.protobuf.json_format import MessageToDict

    events = []
    stop = threading.Event()

    def watch():
        try:
            for ev in stub.WatchFindings(pb.WatchFindingsRequest(after_sequence=0), metadata=meta):
                events.append(ev)
                if stop.is_set():
                    return
        except grpc.RpcError as e:
            if not stop.is_set():
                events.append(e)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    found = {}
    deadline = time.time() + timeout
    while time.time() < deadline and len(found) < len(pids):
        for pid in pids:
            if pid in found:
                continue
            resp = stub.ListFindings(pb.ListFindingsRequest(kind="deadlock", pid=pid,
                                                            status=pb.STATUS_ACTIVE), metadata=meta)
            if resp.findings:
                found[pid] = resp.findings[0]
        time.sleep(0.2)
    if len(found) < len(pids):
        fail(f"no deadlock finding within {timeout}s for pids {sorted(set(pids) - set(found))}")

    summary = {"ok": True, "targets": []}
    for pid, f in found.items():
        # The watch stream delivered it.
        deadline = time.time() + 10
        opened = None
        while time.time() < deadline and opened is None:
            for ev in list(events):
                if isinstance(ev, grpc.RpcError):
                    fail(f"watch failed: {ev.code()} {ev.details()}")
                if ev.type == pb.EVENT_TYPE_OPENED and ev.finding.id == f.id:
                    opened = ev
            time.sleep(0.1)
        if opened is None:
            fail(f"the watch stream did not deliver the finding {f.id} of pid {pid}")
        got = stub.GetFinding(pb.GetFindingRequest(id=f.id), metadata=meta)
        if got.id != f.id or got.kind != "deadlock":
            fail(f"GetFinding returned {got.id} {got.kind}")

        trig = stub.TriggerCapture(pb.TriggerCaptureRequest(pid=pid, kind="dump"), metadata=meta)
        info, data = None, b""
        for chunk in stub.GetCapture(pb.GetCaptureRequest(capture_id=trig.capture_id, wait=True),
                                     metadata=meta):
            if chunk.HasField("info"):
                info = chunk.info
            else:
                data += chunk.data
        if info is None or info.status != pb.CAPTURE_STATUS_DONE:
            fail(f"capture {trig.capture_id}: {info}")
        if len(data) != info.size_bytes:
            fail(f"capture size {len(data)} != {info.size_bytes}")
        dump = json.loads(data)
        summary["targets"].append({
            "pid": pid,
            "finding": MessageToDict(got, preserving_proto_field_name=True),
            "watch_sequence": opened.sequence,
            "capture": {"id": trig.capture_id, "media_type": info.media_type, "size": info.size_bytes,
                        "deadlocks": len(dump.get("deadlocks", [])), "threads": len(dump.get("threads", []))},
        })
    status = stub.GetAgentStatus(pb.GetAgentStatusRequest(), metadata=meta)
    summary["status"] = MessageToDict(status, preserving_proto_field_name=True)
    stop.set()
    print(json.dumps(summary))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--token")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sc = sub.add_parser("scenario")
    sc.add_argument("--pid", type=int, action="append", required=True)
    sc.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args()

    out = Path(tempfile.mkdtemp(prefix="pymedic-grpc-"))
    generate(out)
    from pymedic.v1 import diagnostics_pb2 as pb  # noqa: E402  (generated)
    from pymedic.v1 import capture_pb2, finding_pb2  # noqa: E402,F401
    from pymedic.v1 import diagnostics_pb2_grpc as rpc  # noqa: E402

    # The enums and capture messages live in their own modules: expose them
    # on one namespace for brevity.
    for mod in (finding_pb2, capture_pb2):
        for name in dir(mod):
            if not name.startswith("_") and not hasattr(pb, name):
                setattr(pb, name, getattr(mod, name))
    meta = [("authorization", f"Bearer {args.token}")] if args.token else []
    channel = grpc.insecure_channel(args.addr)
    grpc.channel_ready_future(channel).result(timeout=10)
    stub = rpc.DiagnosticsStub(channel)
    if args.cmd == "scenario":
        scenario(stub, pb, meta, args.pid, args.timeout)


if __name__ == "__main__":
    main()
