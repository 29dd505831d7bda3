"""Checks deploy/kubernetes beyond schema validity: what the agent needs to
run on a node. Usage: check_deploy.py DEPLOY_DIR OUT_TOML
Writes the agent config embedded in the ConfigMap to OUT_TOML (the Rust test
then has `pymedic agent --check-config` validate it). Exits non-zero with a
message on the first problem."""
import re
import sys
from pathlib import Path

import yaml

deploy = Path(sys.argv[1])
out_toml = Path(sys.argv[2])
text = (deploy / "kubernetes/daemonset.yaml").read_text()
ds = yaml.safe_load(text)
spec = ds["spec"]["template"]["spec"]
problems = []


def need(cond, what):
    if not cond:
        problems.append(what)


need(spec.get("hostPID") is True, "hostPID must be true to see every process")
(agent,) = spec["containers"]
sc = agent["securityContext"]
need(sc.get("privileged") is False, "the agent must not run privileged (capabilities instead)")
need(sc["capabilities"].get("drop") == ["ALL"], "capabilities: drop ALL, then add the minimum")
added = sc["capabilities"]["add"]
need(set(added) <= {"BPF", "PERFMON", "SYS_PTRACE", "SYS_ADMIN", "DAC_READ_SEARCH"},
     f"unexpected capabilities {added}")
need({"BPF", "PERFMON", "SYS_PTRACE"} <= set(added), "BPF, PERFMON and SYS_PTRACE are required")
# Every added capability has a comment line right above it explaining why.
lines = text.splitlines()
for cap in added:
    idx = next(i for i, l in enumerate(lines) if re.match(rf"\s*- {cap}\s*$", l))
    need(lines[idx - 1].strip().startswith("#"), f"capability {cap} has no comment saying why")
mounts = {m["mountPath"] for m in agent["volumeMounts"]}
for path in ["/sys/kernel/btf", "/sys/kernel/tracing", "/sys/kernel/debug", "/var/lib/pymedic"]:
    need(path in mounts, f"missing mount {path}")
vols = {v["name"]: v for v in spec["volumes"]}
need(vols["data"]["hostPath"]["path"] == "/var/lib/pymedic", "the data dir must be a hostPath")
limits = agent["resources"]["limits"]
need("cpu" in limits and "memory" in limits, "resource limits for cpu and memory")
need(agent["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe on /readyz")
need(agent["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness probe on /healthz")
ports = {p["containerPort"] for p in agent["ports"]}

cm = yaml.safe_load((deploy / "kubernetes/configmap.yaml").read_text())
toml_text = cm["data"]["pymedic.toml"]
out_toml.write_text(toml_text)
m = re.search(r'^listen = "[^"]*:(\d+)"', toml_text, re.M)
need(m and int(m.group(1)) in ports, "the config's gRPC port is a container port")
m = re.search(r'^metrics_listen = "[^"]*:(\d+)"', toml_text, re.M)
need(m and int(m.group(1)) in ports, "the config's metrics port is a container port")
kust = yaml.safe_load((deploy / "kubernetes/kustomization.yaml").read_text())
for r in kust["resources"]:
    need((deploy / "kubernetes" / r).exists(), f"kustomization lists missing {r}")

if problems:
    print("\n".join(problems))
    sys.exit(1)
print("deploy OK")
