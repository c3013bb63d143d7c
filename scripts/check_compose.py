#!/usr/bin/env python3
"""Checks the compose stack's hardening and validity (make lint and make test, through
scripts/check-compose.sh):

  * every file variant (the default, `--env-file deploy/compose/s3.env`, `-f deploy/compose/gpu.yml`,
    `-f deploy/compose/tls.yml`)
    is accepted by `docker-compose config` (compose v1: unknown keys, bad conditions, undeclared
    volumes or secrets fail);
  * every service in the resolved file runs as a non-root user, with a read-only root
    filesystem, all capabilities dropped, no-new-privileges, memory and CPU limits, a restart
    policy, no privileged mode, no host network or PID namespace, and an image built here
    (brats/*), never one to pull;
  * no service disables the health check its image declares (grpc.health.v1 through bratsctl).

--self-test plants each fault in a copy of docker-compose.yml and fails unless the check
catches it, so the check itself cannot silently pass.

Usage: check_compose.py [--self-test] [FILE]   (run from the repository root)
"""
import copy
import os
import subprocess
import sys
import tempfile

import yaml

# (name, override files, env file): the ways docker-compose.yml's header says to start the stack.
VARIANTS = [
    ("default", [], None),
    ("s3", [], "deploy/compose/s3.env"),
    ("gpu", ["deploy/compose/gpu.yml"], None),
    ("tls", ["deploy/compose/tls.yml"], None),
]


def resolve(path, overrides, env_file):
    """The file as compose resolves it (interpolated, merged), or an error message."""
    cmd = ["docker-compose", "--project-directory", ".", "-f", path]
    for o in overrides:
        cmd += ["-f", o]
    if env_file:
        cmd += ["--env-file", env_file]
    result = subprocess.run(cmd + ["config"], capture_output=True, text=True)
    if result.returncode != 0:
        return None, result.stderr.strip()
    return yaml.safe_load(result.stdout), None


def findings(config):
    """One line per broken rule of the resolved file."""
    out = []
    for name, svc in (config.get("services") or {}).items():
        where = f"service {name}"
        user = str(svc.get("user", ""))
        if not user or user.split(":")[0] in ("0", "root"):
            out.append(f"{where}: runs as root; set user: \"65532:65532\"")
        if svc.get("read_only") is not True:
            out.append(f"{where}: root filesystem writable; set read_only: true")
        if "ALL" not in (svc.get("cap_drop") or []):
            out.append(f"{where}: capabilities kept; set cap_drop: [ALL]")
        if svc.get("cap_add"):
            out.append(f"{where}: cap_add {svc['cap_add']}; the services need no capability")
        if not any(str(o).startswith("no-new-privileges") for o in svc.get("security_opt") or []):
            out.append(f"{where}: privilege escalation allowed; add security_opt: [\"no-new-privileges:true\"]")
        if svc.get("privileged"):
            out.append(f"{where}: privileged; remove privileged: true")
        if svc.get("network_mode") == "host" or svc.get("pid") == "host":
            out.append(f"{where}: shares a host namespace (network_mode/pid host)")
        if not svc.get("mem_limit") or not svc.get("cpus"):
            out.append(f"{where}: no resource limits; set mem_limit and cpus")
        if not svc.get("restart"):
            out.append(f"{where}: no restart policy; set restart: unless-stopped")
        image = str(svc.get("image", ""))
        if not image.startswith("brats/"):
            out.append(f"{where}: image {image or '(none)'} is not built here (brats/*); nothing may be pulled")
        if svc.get("healthcheck", {}).get("disable"):
            out.append(f"{where}: health check disabled")
    return out


def check(path, variants=VARIANTS):
    problems = []
    for name, overrides, env_file in variants:
        config, error = resolve(path, overrides, env_file)
        if error:
            problems.append(f"{name}: docker-compose config refused it: {error}")
        else:
            problems += [f"{name}: {f}" for f in findings(config)]
    return problems


FAULTS = {
    "an unknown key": lambda d: d["services"]["preprocess"].update({"restart_polcy": "always"}),
    "a root user": lambda d: d["services"]["trainer"].update({"user": "0:0"}),
    "a privileged container": lambda d: d["services"]["inference"].update({"privileged": True}),
    "a service without limits": lambda d: d["services"]["preprocess"].pop("mem_limit"),
    "capabilities kept": lambda d: d["services"]["trainer"].pop("cap_drop"),
    "an image from a registry": lambda d: d["services"]["moto"].update({"image": "minio/minio:latest"}),
}


def self_test(path):
    with open(path) as f:
        original = yaml.safe_load(f)
    failures = []
    for fault, plant in FAULTS.items():
        doc = copy.deepcopy(original)
        plant(doc)
        with tempfile.NamedTemporaryFile("w", suffix=".yml", dir=".", delete=False) as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        try:
            if not check(f.name, VARIANTS[:1]):
                failures.append(f"self-test: {fault} was not caught")
        finally:
            os.unlink(f.name)
    return failures


def main(argv):
    if subprocess.run(["docker-compose", "version"], capture_output=True).returncode != 0:
        print("check-compose: SKIP: docker-compose (compose v1) is not installed", file=sys.stderr)
        return 0
    path = next((a for a in argv if not a.startswith("--")), "docker-compose.yml")
    problems = check(path)
    if "--self-test" in argv:
        problems += self_test(path)
    for p in problems:
        print(f"check-compose: {p}", file=sys.stderr)
    if not problems:
        print(f"check-compose: {path} ok ({len(VARIANTS)} variants" + (f", {len(FAULTS)} planted faults caught)" if "--self-test" in argv else ")"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
