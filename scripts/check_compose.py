#!/usr/bin/env python3
"""Checks the compose stack's hardening and validity, for compose v1 and v2 (make lint and
make check-compose run it with --self-test):

  * compose v1, by running it: every file variant (the default, `--env-file
    deploy/compose/s3.env`, `-f deploy/compose/gpu.yml`, `-f deploy/compose/tls.yml`) is
    accepted by `docker-compose config` (docker-compose 1.29: unknown keys, bad conditions,
    undeclared volumes or secrets fail);
  * compose v2, by the schema it validates with, not by running it (v2 is not installed here):
    deploy/compose/compose-spec.json, compose-go's copy of the Compose Specification schema
    (deploy/compose/compose-spec.NOTICE names the release). For every variant, each file compose
    reads (docker-compose.yml and the variant's override file) is loaded as v2 loads it (YAML
    1.2 booleans, `${VAR:-default}` interpolation from the env file and the environment, then
    v2's casts of interpolated strings to numbers and booleans, e.g. `cpus`) and validated,
    and so is the merged file `docker-compose config` prints (v2 validates its own merge after
    each file; v1's merge stands in for it). Each violation is reported with
    its path (services.inference.deploy...). Some files v1 accepts, v2 refuses: a GPU device
    reservation without `capabilities`, an unknown volume `type`, a one-character
    container_name;
  * every service in the resolved file runs as a non-root user, with a read-only root
    filesystem, all capabilities dropped, no-new-privileges, memory and CPU limits, a restart
    policy, no privileged mode, no host network or PID namespace, and an image built here
    (brats/*), never one to pull;
  * no service disables the health check its image declares (grpc.health.v1 through bratsctl).

--self-test plants each fault in a copy of docker-compose.yml (or of an override file) and fails
unless the check catches it, and names the finding it must produce, so the check itself cannot
silently pass. Without docker-compose only the schema check of each file runs (no merged file).

Usage: check_compose.py [--self-test] [FILE]   (run from the repository root)
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

try:
    import jsonschema
except ImportError:  # .deps/venv has it (scripts/bootstrap.sh)
    jsonschema = None

# (name, override files, env file): the ways docker-compose.yml's header says to start the stack.
VARIANTS = [
    ("default", [], None),
    ("s3", [], "deploy/compose/s3.env"),
    ("gpu", ["deploy/compose/gpu.yml"], None),
    ("tls", ["deploy/compose/tls.yml"], None),
]

# The Compose Specification schema compose v2 validates every file with (compose-go's
# schema/compose-spec.json, vendored; JSON Schema draft 2020-12, no format assertions).
SPEC = "deploy/compose/compose-spec.json"


def spec_validator():
    with open(SPEC) as f:
        schema = json.load(f)
    # The draft the schema declares ($schema), as compose-go compiles it; like compose-go,
    # no format checker (the schema declares no format either).
    return jsonschema.validators.validator_for(schema)(schema)


def json_path(parts):
    """services.inference.volumes[0] for a jsonschema error's absolute_path."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def most_specific(error):
    """For oneOf/anyOf, the deepest sub-error (compose-go reports the same one)."""
    best, score = error, -1
    for sub in error.context or []:
        sub = most_specific(sub)
        s = len(sub.absolute_path) + (1 if sub.validator == "additionalProperties" else 0)
        if s > score:
            best, score = sub, s
    return best


def spec_findings(validator, doc):
    """One line per schema violation: its path and what is wrong."""
    out = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        e = most_specific(error)
        message = e.message if len(e.message) <= 200 else e.message[:200] + "..."
        out.append(f"{json_path(e.absolute_path)}: {message}")
    return out


class V2Loader(yaml.SafeLoader):
    """YAML as compose v2 (go-yaml v3) reads it: only true/false are booleans (YAML 1.2), so
    `on`, `yes` and friends stay strings."""


V2Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
V2Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def env_file_values(path):
    values = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]
                values[key.strip()] = value
    return values


def compose_env(env_file):
    """The variables compose interpolates with: the env file (or ./.env), then the environment."""
    path = env_file or ".env"
    env = env_file_values(path) if os.path.exists(path) else {}
    env.update(os.environ)
    return env


class InterpolationError(Exception):
    pass


NAME = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*")


def substitute(s, env):
    """compose-go's template.Substitute: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e},
    ${VAR?e}, ${VAR:+r}, ${VAR+r}, with nested templates in the defaults."""
    out, i = [], 0
    while i < len(s):
        if s[i] != "$":
            out.append(s[i])
            i += 1
            continue
        rest = s[i + 1:]
        if rest.startswith("$"):
            out.append("$")
            i += 2
        elif rest.startswith("{"):
            depth, j = 0, i + 1
            while j < len(s):
                if s[j] == "{":
                    depth += 1
                elif s[j] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if j >= len(s):
                raise InterpolationError(f"invalid interpolation format: {s!r}")
            out.append(expand(s[i + 2:j], env, s))
            i = j + 1
        elif NAME.match(rest):
            name = NAME.match(rest).group()
            out.append(env.get(name, ""))
            i += 1 + len(name)
        else:
            raise InterpolationError(f"invalid interpolation format: {s!r} (write $$ for a $)")
    return "".join(out)


def expand(body, env, template):
    m = NAME.match(body)
    if not m:
        raise InterpolationError(f"invalid interpolation format: {template!r}")
    name, op = m.group(), body[m.end():]
    if not op:
        return env.get(name, "")
    value = env.get(name)
    for sep in (":-", "-", ":?", "?", ":+", "+"):
        if op.startswith(sep):
            arg = op[len(sep):]
            if sep in (":-", "-"):
                absent = value is None or (sep == ":-" and value == "")
                return substitute(arg, env) if absent else value
            if sep in (":?", "?"):
                if value is None or (sep == ":?" and value == ""):
                    raise InterpolationError(f"required variable {name} is missing a value: {substitute(arg, env)}")
                return value
            present = value is not None and (sep == "+" or value != "")
            return substitute(arg, env) if present else (value or "")
    raise InterpolationError(f"invalid interpolation format: {template!r}")


def _bool(v):
    low = v.lower()
    if low in ("true", "y", "yes", "on"):
        return True
    if low in ("false", "n", "no", "off"):
        return False
    raise ValueError(f"invalid boolean: {v}")


# compose-go's loader/interpolate.go: the strings it casts after interpolation ("*" any key,
# "[]" any list item). Everything else stays a string, which the schema allows where
# interpolation may appear.
_S = ("services", "*")
CASTS = {
    **{_S + (k,): int for k in ("cpu_count", "cpu_period", "cpu_quota", "cpu_rt_period",
                                "cpu_rt_runtime", "cpu_shares", "oom_score_adj", "pids_limit",
                                "scale")},
    _S + ("cpu_percent",): float,
    _S + ("cpus",): float,
    **{_S + (k,): _bool for k in ("init", "oom_kill_disable", "privileged", "read_only",
                                  "stdin_open", "tty")},
    _S + ("depends_on", "*", "required"): _bool,
    _S + ("depends_on", "*", "restart"): _bool,
    _S + ("deploy", "replicas"): int,
    _S + ("deploy", "update_config", "parallelism"): int,
    _S + ("deploy", "update_config", "max_failure_ratio"): float,
    _S + ("deploy", "rollback_config", "parallelism"): int,
    _S + ("deploy", "rollback_config", "max_failure_ratio"): float,
    _S + ("deploy", "restart_policy", "max_attempts"): int,
    _S + ("deploy", "placement", "max_replicas_per_node"): int,
    _S + ("healthcheck", "retries"): int,
    _S + ("healthcheck", "disable"): _bool,
    _S + ("ports", "[]", "target"): int,
    _S + ("ulimits", "*"): int,
    _S + ("ulimits", "*", "hard"): int,
    _S + ("ulimits", "*", "soft"): int,
    _S + ("volumes", "[]", "read_only"): _bool,
    _S + ("volumes", "[]", "volume", "nocopy"): _bool,
    **{(top, "*", k): _bool for top in ("networks",)
       for k in ("external", "internal", "attachable", "enable_ipv4", "enable_ipv6")},
    **{(top, "*", "external"): _bool for top in ("volumes", "secrets", "configs")},
}


def caster(path):
    for pattern, cast in CASTS.items():
        if len(pattern) == len(path) and all(p in ("*", q) for p, q in zip(pattern, path)):
            return cast
    return None


def interpolate(value, env, path=()):
    """A file's YAML after compose v2's interpolation and casts; errors name the path."""
    if isinstance(value, str):
        try:
            new = substitute(value, env)
        except InterpolationError as e:
            raise InterpolationError(f"{'.'.join(path)}: {e}") from None
        cast = caster(path)
        if cast is None:
            return new
        try:
            return cast(new)
        except ValueError:
            raise InterpolationError(f"{'.'.join(path)}: {new!r} cannot be cast to {cast.__name__.strip('_')}") from None
    if isinstance(value, dict):
        return {str(k): interpolate(v, env, path + (str(k),)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, path + ("[]",)) for v in value]
    return value


def v2_file_findings(validator, path, env):
    """The schema violations of one file as compose v2 reads it, or why it cannot be read."""
    try:
        with open(path) as f:
            doc = yaml.load(f, Loader=V2Loader)
        if not isinstance(doc, dict):
            return ["top-level object must be a mapping"]
        doc = interpolate(doc, env)
    except (yaml.YAMLError, InterpolationError) as e:
        return [str(e).replace("\n", " ")]
    return spec_findings(validator, doc)


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


def check(path, variants=VARIANTS, v1=True):
    problems = []
    validator = spec_validator()
    for name, overrides, env_file in variants:
        env = compose_env(env_file)
        for f in [path] + overrides:
            problems += [f"{name}: compose v2 schema, {f}: {p}" for p in v2_file_findings(validator, f, env)]
        if not v1:
            continue
        config, error = resolve(path, overrides, env_file)
        if error:
            problems.append(f"{name}: docker-compose config refused it: {error}")
        else:
            problems += [f"{name}: compose v2 schema, merged (docker-compose config): {p}"
                         for p in spec_findings(validator, config)]
            problems += [f"{name}: {f}" for f in findings(config)]
    return problems


def gpu_device(d):
    return d["services"]["inference"]["deploy"]["resources"]["reservations"]["devices"][0]


# fault: (file to plant it in (None: FILE), plant, texts the problems must contain, each in one
# of them). The last three are accepted by compose v1 (docker-compose config) and refused by
# compose v2's schema only: the first in the override file and in the merged file.
FAULTS = {
    "an unknown key": (None, lambda d: d["services"]["preprocess"].update({"restart_polcy": "always"}), "restart_polcy"),
    "a root user": (None, lambda d: d["services"]["trainer"].update({"user": "0:0"}), "runs as root"),
    "a privileged container": (None, lambda d: d["services"]["inference"].update({"privileged": True}), "privileged"),
    "a service without limits": (None, lambda d: d["services"]["preprocess"].pop("mem_limit"), "no resource limits"),
    "capabilities kept": (None, lambda d: d["services"]["trainer"].pop("cap_drop"), "capabilities kept"),
    "an image from a registry": (None, lambda d: d["services"]["moto"].update({"image": "minio/minio:latest"}), "not built here"),
    "a GPU reservation without capabilities (v2 only)": (
        "deploy/compose/gpu.yml", lambda d: gpu_device(d).pop("capabilities"),
        ("reservations.devices[0]: 'capabilities' is a required property",
         "merged (docker-compose config): services.inference.deploy.resources.reservations.devices[0]")),
    "an unknown volume type (v2 only)": (
        None, lambda d: d["services"]["trainer"]["volumes"].__setitem__(0, {"type": "volumes", "source": "data", "target": "/data"}),
        "services.trainer.volumes[0].type: 'volumes' is not one of"),
    "a one-character container_name (v2 only)": (
        None, lambda d: d["services"]["inference"].update({"container_name": "i"}),
        "services.inference.container_name: 'i' does not match"),
}


def self_test(path, v1=True):
    failures = []
    for fault, (target, plant, expect) in FAULTS.items():
        source = target or path
        with open(source) as f:
            doc = yaml.safe_load(f)
        plant(doc)
        with tempfile.NamedTemporaryFile("w", suffix=".yml", dir=os.path.dirname(source) or ".", delete=False) as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        try:
            planted = os.path.relpath(f.name)
            variant = ("planted", [planted], None) if target else ("planted", [], None)
            problems = check(path if target else planted, [variant], v1)
            if not v1 and "(v2 only)" not in fault:
                continue  # v1's part of the check did not run
            for want in [expect] if isinstance(expect, str) else expect:
                if (v1 or "merged" not in want) and not any(want in p for p in problems):
                    failures.append(f"self-test: {fault} was not caught (wanted a finding with {want!r}; got {problems})")
        finally:
            os.unlink(f.name)
    return failures


def main(argv):
    if jsonschema is None:
        print("check-compose: jsonschema is missing; run scripts/bootstrap.sh and use .deps/venv/bin/python", file=sys.stderr)
        return 1
    try:
        v1 = subprocess.run(["docker-compose", "version"], capture_output=True).returncode == 0
    except OSError:
        v1 = False
    if not v1:
        print("check-compose: SKIP: docker-compose (compose v1) is not installed: only the compose v2 "
              "schema check of each file runs (no merged file)", file=sys.stderr)
    path = next((a for a in argv if not a.startswith("--")), "docker-compose.yml")
    problems = check(path, VARIANTS, v1)
    if "--self-test" in argv:
        problems += self_test(path, v1)
    for p in problems:
        print(f"check-compose: {p}", file=sys.stderr)
    planted = len([f for f in FAULTS if v1 or "(v2 only)" in f])
    if not problems:
        print(f"check-compose: {path} ok ({len(VARIANTS)} variants, compose v1" + (" and" if v1 else " skipped,")
              + " v2 schema" + (f", {planted} planted faults caught)" if "--self-test" in argv else ")"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
