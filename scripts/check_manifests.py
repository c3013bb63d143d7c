#!/usr/bin/env python3
"""Policy and consistency checks of the Kubernetes manifests under deploy/k8s/ (run by
scripts/check-manifests.sh, which renders them with `kubectl kustomize` and validates them against
the Kubernetes schemas first). Standard library plus PyYAML (.deps/venv).

    check_manifests.py configs                       the TOML copies in deploy/k8s match deploy/*.toml
    check_manifests.py policy RENDERED.yaml...       the rules below, on rendered manifests
    check_manifests.py selftest --validate CMD...    plants faults in a copy of the base; each must fail

Every finding is one line, `<where>: <Kind>/<name>: <what is wrong>`; any finding exits 1.

Policy (every pod template: Deployment, StatefulSet, DaemonSet, Job, CronJob, Pod):
- every container and init container: requests and limits for cpu and memory; runAsNonRoot;
  no runAsUser/runAsGroup 0; not privileged; allowPrivilegeEscalation false;
  readOnlyRootFilesystem; capabilities drop ALL and add nothing; seccomp RuntimeDefault; an
  image brats/{preprocess,inference,trainer} with a tag other than latest; no $(VAR) in an env
  value before VAR is defined;
- pods: no hostNetwork/hostPID/hostIPC, no hostPath volume, no service-account token, no
  service links (their FOO_PORT variables would reach the BRATS_* configuration loader), an
  emptyDir at /tmp (the root filesystem is read-only);
- gRPC containers (a port named grpc): readiness and liveness probes (and a startup probe for
  inference and trainer), each with exactly one handler, grpc probes on the grpc port,
  readiness (and the trainer's startup) on the service's own name; a port
  named metrics and prometheus.io annotations naming it; the listen and metrics_listen ports of
  the TOML in the mounted ConfigMap equal to those ports; the BRATS_<SERVICE>_CONFIG file in it;
  a TensorRT cache volume mounted at the configuration's trt_cache_dir;
- a Service with ports grpc and metrics for each gRPC Deployment; a PodDisruptionBudget for
  preprocess and inference; the trainer a single replica with the Recreate strategy;
- a Namespace with pod-security.kubernetes.io/enforce: restricted, and every namespaced object
  in it;
- NetworkPolicies: a default-deny (all pods, Ingress and Egress, no rules) and, for every
  Deployment, a policy that admits ingress to it;
- no Secret objects (no secret values in the repository); every Secret a pod names is one of
  EXTERNAL_SECRETS, every ConfigMap and PersistentVolumeClaim it names is in the rendering.
"""

import argparse
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

try:
    import yaml
except ImportError:
    sys.exit("check_manifests.py: PyYAML is missing: run `make bootstrap` (it installs it into .deps/venv)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "deploy", "k8s")
SERVICES = ("preprocess", "inference", "trainer")
IMAGES = {f"brats/{s}" for s in SERVICES}
# Health service names (grpc.health.v1) of the three servers.
HEALTH = {"preprocess": "brats.v1.Preprocessor", "inference": "brats.v1.Inference", "trainer": "brats.v1.Trainer"}
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass"}
# How the tls component's configurations differ from deploy/<svc>.toml + deploy/security.toml's
# sections (`check_manifests.py tls-configs` writes them so; `configs` fails on any other change).
# The ServiceAccount of a trainer that hands jobs to Kubeflow Trainer (components/kubeflow).
TRAINER_ACCOUNT = "brats-trainer"
# What its Role may grant: TrainJobs, and only the calls the trainer makes.
TRAINER_RULES = {("trainer.kubeflow.org", "trainjobs"): {"get", "create", "delete"}}


def check_trainer_role(where, by_kind):
    """The trainer's ServiceAccount is bound to Roles granting at most TRAINER_RULES, and no
    ClusterRoleBinding names it."""
    f = []
    bound = []
    for b in by_kind.get("RoleBinding", []) + by_kind.get("ClusterRoleBinding", []):
        if any(s.get("kind") == "ServiceAccount" and s.get("name") == TRAINER_ACCOUNT for s in b.get("subjects") or []):
            if b["kind"] == "ClusterRoleBinding" or b["roleRef"].get("kind") != "Role":
                f.append(f"{where}: {b['kind']}/{b['metadata']['name']}: {TRAINER_ACCOUNT} may only be bound to a namespaced Role")
            bound.append(b["roleRef"].get("name"))
    if not bound:
        f.append(f"{where}: the trainer mounts {TRAINER_ACCOUNT}'s token but no RoleBinding gives it anything")
    for role in by_kind.get("Role", []):
        if role["metadata"]["name"] not in bound:
            continue
        for rule in role.get("rules") or []:
            for group in rule.get("apiGroups") or [""]:
                for resource in rule.get("resources") or []:
                    allowed = TRAINER_RULES.get((group, resource), set())
                    extra = set(rule.get("verbs") or []) - allowed
                    if extra:
                        f.append(f"{where}: Role/{role['metadata']['name']}: {sorted(extra)} on {group or 'core'}/{resource} is more than the trainer needs")
    return f


TLS_DROPPED = {("server", "auth", "jwt"): "an OIDC key set needs an egress NetworkPolicy to the provider"}
TLS_OVERRIDES = {
    ("server", "audit", "stdout"): (True, "every record also to the cluster's log shipper"),
    ("server", "audit", "store_uri"): ("file:///data/audit/", "the shared volume: no S3 egress "
                                       "needed (the gpu-s3-tls overlay points it at the bucket)"),
}
# Secrets the manifests reference but never hold (deploy/k8s/README.md says how to create them).
EXTERNAL_SECRETS = {"brats-s3-credentials", "brats-api-keys", "brats-audit-hmac"} | {f"brats-{s}-tls" for s in SERVICES}
SECURITY_SERVER_OWN = ("listen", "metrics_listen", "shutdown_grace_s")  # each service's own


# ---------------------------------------------------------------- configuration copies

def flatten(table, prefix=()):
    out = {}
    for k, v in table.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def load_toml(path, findings):
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        findings.append(f"{path}: not readable TOML: {e}")
        return None


def rel(path):
    return os.path.relpath(path, ROOT)


def check_configs(deploy_dir, k8s_dir):
    """Paths in findings are relative to deploy_dir's parent (the repository, or a copy of it).
    The base's copies equal deploy/*.toml byte for byte; the tls component's configurations
    equal deploy/<svc>.toml plus deploy/security.toml's sections, but for TLS_DROPPED and
    TLS_OVERRIDES."""
    findings = []
    top = os.path.dirname(deploy_dir)
    rel = lambda p: os.path.relpath(p, top)  # noqa: E731
    security = load_toml(os.path.join(deploy_dir, "security.toml"), findings)
    for svc in SERVICES:
        src = os.path.join(deploy_dir, f"{svc}.toml")
        copy_ = os.path.join(k8s_dir, "base", "config", f"{svc}.toml")
        try:
            same = open(src, "rb").read() == open(copy_, "rb").read()
        except OSError as e:
            findings.append(f"{rel(copy_)}: {e.strerror}")
            continue
        if not same:
            findings.append(f"{rel(copy_)}: differs from {rel(src)}; copy it again "
                            f"(cp {rel(src)} {rel(copy_)})")
        tls_path = os.path.join(k8s_dir, "components", "tls", "config", f"{svc}.toml")
        base = load_toml(src, findings)
        tls = load_toml(tls_path, findings)
        if base is None or tls is None or security is None:
            continue
        expected = copy.deepcopy(base)
        sec = copy.deepcopy(security)
        for k in SECURITY_SERVER_OWN:
            sec.get("server", {}).pop(k, None)
        merge(expected, sec)
        for path in TLS_DROPPED:
            t = expected
            for k in path[:-1]:
                t = t.get(k, {})
            t.pop(path[-1], None)
        want, got = flatten(expected), flatten(tls)
        for path, (value, _why) in TLS_OVERRIDES.items():
            want[path] = value
        for path in sorted(set(want) | set(got)):
            key = ".".join(path)
            if path not in got:
                findings.append(f"{rel(tls_path)}: {key} missing (it is {want[path]!r} in "
                                f"{rel(src)} or deploy/security.toml)")
            elif path not in want:
                findings.append(f"{rel(tls_path)}: {key} is neither in {rel(src)} nor in deploy/security.toml")
            elif want[path] != got[path]:
                findings.append(f"{rel(tls_path)}: {key} = {got[path]!r}, but {want[path]!r} in "
                                f"{rel(src)} or deploy/security.toml")
    return findings


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(v)


def write_tls_configs(deploy_dir, k8s_dir):
    """Writes components/tls/config/<svc>.toml from deploy/<svc>.toml and deploy/security.toml's
    sections (text, comments kept): security.toml's [server] keys but the service's own go into
    the service's [server] table, the other sections follow; TLS_DROPPED sections are left out
    and TLS_OVERRIDES keys rewritten."""
    lines = open(os.path.join(deploy_dir, "security.toml")).read().splitlines()
    headers = [i for i, l in enumerate(lines) if l.startswith("[")]
    starts = []  # each section with the comment block just above its header
    for i in headers:
        j = i
        while j > 0 and lines[j - 1].startswith("#"):
            j -= 1
        starts.append(j)
    chunks = []
    for n, (start, head) in enumerate(zip(starts, headers)):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        name = tuple(k.strip().strip('"') for k in re.findall(r'(?:"[^"]*"|[^.\[\]]+)', lines[head]))
        chunks.append((name, lines[start:end]))
    server_extra, rest = [], []
    for name, body in chunks:
        if name == ("server",):
            server_extra = [l for l in body[1:] if not re.match(r"(%s)\s*=" % "|".join(SECURITY_SERVER_OWN), l)
                            and not l.startswith("[")]
            server_extra = [l for l in server_extra if l.strip() or server_extra]
            continue
        if name in TLS_DROPPED:
            rest.append(f"# [{'.'.join(name)}] left out in Kubernetes: {TLS_DROPPED[name]}.")
            rest.append("")
            continue
        for path, (value, why) in TLS_OVERRIDES.items():
            if name == path[:-1]:
                body = [f"{path[-1]} = {toml_value(value)}  # Kubernetes: {why}"
                        if re.match(rf"{path[-1]}\s*=", l) else l for l in body]
        rest += body
    while server_extra and not server_extra[-1].strip():
        server_extra.pop()
    for svc in SERVICES:
        own = open(os.path.join(deploy_dir, f"{svc}.toml")).read().splitlines()
        at = next((i for i, l in enumerate(own) if l.startswith("shutdown_grace_s")), None)
        if at is None:
            at = own.index("[server]")
        out = [f"# GENERATED by `scripts/check_manifests.py tls-configs` from deploy/{svc}.toml and the sections",
               "# of deploy/security.toml: the tls overlay's configuration. Do not edit; `make check-manifests`",
               "# fails when it no longer matches those files."]
        out += own[:at + 1] + server_extra + own[at + 1:]
        out += ["", "# ---- deploy/security.toml's sections " + "-" * 58] + rest
        path = os.path.join(k8s_dir, "components", "tls", "config", f"{svc}.toml")
        with open(path, "w") as fh:
            fh.write("\n".join(out).rstrip("\n") + "\n")
        print(f"wrote {rel(path)}")


def merge(base, overlay):
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v


# ---------------------------------------------------------------- policy on rendered manifests

def port_of(address):
    m = re.search(r":(\d+)$", address or "")
    return int(m.group(1)) if m else None


def handlers(probe):
    return [h for h in ("exec", "grpc", "httpGet", "tcpSocket") if probe.get(h) is not None]


def pod_template(doc):
    spec = doc.get("spec") or {}
    if doc["kind"] == "Pod":
        return doc.get("metadata") or {}, spec
    if doc["kind"] == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec") or {})
    t = spec.get("template") or {}
    return t.get("metadata") or {}, t.get("spec") or {}


def selects(selector, labels):
    """A LabelSelector (matchLabels, matchExpressions) against a label map."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        op, key, values = e.get("operator"), e.get("key"), e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def check_container(where, c, pod_sc, init):
    f = []
    what = f"{'init container' if init else 'container'} {c.get('name')}"
    res = c.get("resources") or {}
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in (res.get(kind) or {}):
                f.append(f"{where}: {what}: no resources.{kind}.{r}")
    sc = c.get("securityContext") or {}
    eff = dict(pod_sc)
    eff.update({k: v for k, v in sc.items() if k in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")})
    if eff.get("runAsNonRoot") is not True:
        f.append(f"{where}: {what}: runAsNonRoot is not true")
    for k in ("runAsUser", "runAsGroup"):
        if eff.get(k) == 0:
            f.append(f"{where}: {what}: {k} 0 (root)")
    if eff.get("runAsUser") is None:
        f.append(f"{where}: {what}: no runAsUser (the image's user would decide)")
    if sc.get("privileged") is True:
        f.append(f"{where}: {what}: privileged: true")
    if sc.get("allowPrivilegeEscalation") is not False:
        f.append(f"{where}: {what}: allowPrivilegeEscalation is not false")
    if sc.get("readOnlyRootFilesystem") is not True:
        f.append(f"{where}: {what}: readOnlyRootFilesystem is not true")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        f.append(f"{where}: {what}: capabilities do not drop ALL")
    if caps.get("add"):
        f.append(f"{where}: {what}: capabilities add {caps['add']}")
    if (eff.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        f.append(f"{where}: {what}: no seccompProfile RuntimeDefault")
    image = c.get("image") or ""
    name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
    if not any(name == i or name.endswith("/" + i) for i in IMAGES):  # a registry prefix is fine
        f.append(f"{where}: {what}: image {image!r} is not one of {sorted(IMAGES)}")
    if not tag or tag == "latest":
        f.append(f"{where}: {what}: image {image!r} has no fixed tag (set it with kustomize images:)")
    defined = set()
    for e in c.get("env") or []:
        for ref in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value") or ""):
            if ref not in defined:
                f.append(f"{where}: {what}: env {e.get('name')} refers to $({ref}), not defined before it "
                         f"(Kubernetes leaves the text unexpanded)")
        defined.add(e.get("name"))
    if not any(m.get("mountPath") == "/tmp" for m in c.get("volumeMounts") or []) and not init:
        f.append(f"{where}: {what}: no writable /tmp (mount an emptyDir; the root filesystem is read-only)")
    return f


def check_grpc_container(where, c, meta, spec, configmaps):
    f = []
    svc = c.get("name")
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    grpc_port = ports.get("grpc")
    need = ["readinessProbe", "livenessProbe"] + (["startupProbe"] if svc in ("inference", "trainer") else [])
    for p in need:
        if not c.get(p):
            f.append(f"{where}: container {svc}: no {p}")
    for p in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = c.get(p)
        if not probe:
            continue
        h = handlers(probe)
        if len(h) != 1:
            f.append(f"{where}: container {svc}: {p} has {len(h)} handlers ({', '.join(h) or 'none'}); exactly one")
        if probe.get("grpc") is not None and probe["grpc"].get("port") != grpc_port:
            f.append(f"{where}: container {svc}: {p} probes port {probe['grpc'].get('port')}, not the grpc port {grpc_port}")
        # Readiness gates traffic on the service's own status; inference's startup probe only
        # asks that the server answers (its model load gates readiness, not liveness).
        if (p == "readinessProbe" or (p == "startupProbe" and svc != "inference")) and svc in HEALTH:
            names = [probe.get("grpc", {}).get("service")] if probe.get("grpc") is not None else \
                [a.split("=", 1)[1] for a in (probe.get("exec") or {}).get("command", []) if a.startswith("--service=")]
            if HEALTH[svc] not in names:
                f.append(f"{where}: container {svc}: {p} does not check {HEALTH[svc]} (SERVING only when ready)")
    metrics = ports.get("metrics")
    if metrics is None:
        f.append(f"{where}: container {svc}: no port named metrics")
    ann = meta.get("annotations") or {}
    if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(metrics):
        f.append(f"{where}: container {svc}: pod annotations prometheus.io/scrape, prometheus.io/port "
                 f"do not name the metrics port {metrics}")
    # The configuration the container reads, from the ConfigMap mounted where its env points.
    env = {e.get("name"): e.get("value") for e in c.get("env") or []}
    cfg_path = env.get(f"BRATS_{svc.upper()}_CONFIG")
    if not cfg_path:
        f.append(f"{where}: container {svc}: no BRATS_{svc.upper()}_CONFIG")
        return f
    vols = {v.get("name"): v for v in spec.get("volumes") or []}
    mount = next((m for m in c.get("volumeMounts") or []
                  if cfg_path.startswith(m.get("mountPath", "").rstrip("/") + "/")
                  and (vols.get(m.get("name")) or {}).get("configMap")), None)
    if mount is None:
        f.append(f"{where}: container {svc}: {cfg_path} is not in a mounted ConfigMap")
        return f
    cm_name = vols[mount["name"]]["configMap"].get("name")
    data = (configmaps.get(cm_name) or {}).get("data") or {}
    key = cfg_path[len(mount["mountPath"].rstrip("/")) + 1:]
    if key not in data:
        f.append(f"{where}: container {svc}: ConfigMap {cm_name} has no key {key} ({cfg_path})")
        return f
    try:
        cfg = tomllib.loads(data[key])
    except tomllib.TOMLDecodeError as e:
        f.append(f"{where}: ConfigMap {cm_name}: {key} is not valid TOML: {e}")
        return f
    server = cfg.get("server") or {}
    if port_of(server.get("listen")) != grpc_port:
        f.append(f"{where}: container {svc}: grpc port {grpc_port} but the configuration listens on {server.get('listen')!r}")
    if port_of(server.get("metrics_listen")) != metrics:
        f.append(f"{where}: container {svc}: metrics port {metrics} but metrics_listen is {server.get('metrics_listen')!r}")
    for m in c.get("volumeMounts") or []:
        pvc = (vols.get(m.get("name")) or {}).get("persistentVolumeClaim") or {}
        if pvc.get("claimName") == "brats-trt-cache" and m.get("mountPath") != cfg.get("trt_cache_dir"):
            f.append(f"{where}: container {svc}: TensorRT cache mounted at {m.get('mountPath')}, "
                     f"but trt_cache_dir is {cfg.get('trt_cache_dir')!r}")
    return f


def check_policy(docs, where):
    f = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    configmaps = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}

    namespaces = [d for d in by_kind.get("Namespace", [])]
    restricted = {d["metadata"]["name"] for d in namespaces
                  if (d["metadata"].get("labels") or {}).get("pod-security.kubernetes.io/enforce") == "restricted"}
    if not restricted:
        f.append(f"{where}: no Namespace labelled pod-security.kubernetes.io/enforce: restricted")
    for d in docs:
        ns = d["metadata"].get("namespace")
        if d["kind"] not in CLUSTER_SCOPED and ns not in restricted:
            f.append(f"{where}: {d['kind']}/{d['metadata']['name']}: namespace {ns!r} is not a restricted "
                     f"namespace of this rendering")
    for d in by_kind.get("Secret", []):
        f.append(f"{where}: Secret/{d['metadata']['name']}: a Secret in the manifests; reference one "
                 f"created outside the repository instead")

    policies = by_kind.get("NetworkPolicy", [])
    default_deny = [p for p in policies if (p["spec"].get("podSelector") in ({}, None)
                    or p["spec"]["podSelector"] == {"matchLabels": {}})
                    and set(p["spec"].get("policyTypes") or []) >= {"Ingress", "Egress"}
                    and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    if not default_deny:
        f.append(f"{where}: no default-deny NetworkPolicy (podSelector {{}}, policyTypes Ingress and Egress, no rules)")

    pdbs = by_kind.get("PodDisruptionBudget", [])
    services = by_kind.get("Service", [])
    for d in docs:
        if d["kind"] not in POD_KINDS | {"Pod", "CronJob"}:
            continue
        name = d["metadata"]["name"]
        w = f"{where}: {d['kind']}/{name}"
        meta, spec = pod_template(d)
        labels = meta.get("labels") or {}
        for k in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(k):
                f.append(f"{w}: {k}: true")
        for v in spec.get("volumes") or []:
            if "hostPath" in v:
                f.append(f"{w}: volume {v.get('name')} is a hostPath")
        # Only the trainer calls the Kubernetes API (TrainJobs, components/kubeflow), as the
        # ServiceAccount whose Role allows exactly that; every other pod mounts no token.
        api_caller = name == "trainer" and spec.get("serviceAccountName") == TRAINER_ACCOUNT
        if spec.get("automountServiceAccountToken") is not False and not api_caller:
            f.append(f"{w}: automountServiceAccountToken is not false (only the trainer, as {TRAINER_ACCOUNT}, calls the Kubernetes API)")
        if api_caller:
            f.extend(check_trainer_role(where, by_kind))
        if spec.get("enableServiceLinks") is not False:
            f.append(f"{w}: enableServiceLinks is not false (service variables would reach the BRATS_* loader)")
        names = {k: {x["metadata"]["name"] for x in by_kind.get(k, [])} for k in ("ConfigMap", "PersistentVolumeClaim")}
        refs = []
        for v in spec.get("volumes") or []:
            if v.get("persistentVolumeClaim"):
                refs.append(("PersistentVolumeClaim", v["persistentVolumeClaim"].get("claimName"), f"volume {v['name']}"))
            if v.get("configMap"):
                refs.append(("ConfigMap", v["configMap"].get("name"), f"volume {v['name']}"))
            if v.get("secret"):
                refs.append(("Secret", v["secret"].get("secretName"), f"volume {v['name']}"))
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            for e in c.get("env") or []:
                src = e.get("valueFrom") or {}
                if src.get("configMapKeyRef"):
                    refs.append(("ConfigMap", src["configMapKeyRef"].get("name"), f"env {e['name']}"))
                if src.get("secretKeyRef"):
                    refs.append(("Secret", src["secretKeyRef"].get("name"), f"env {e['name']}"))
        for kind, ref, what in refs:
            if kind == "Secret" and ref not in EXTERNAL_SECRETS:
                f.append(f"{w}: {what}: Secret {ref!r} is not one of the documented external Secrets")
            elif kind != "Secret" and ref not in names[kind]:
                f.append(f"{w}: {what}: {kind} {ref!r} is not in the rendering")
        pod_sc = spec.get("securityContext") or {}
        for c in spec.get("initContainers") or []:
            f += check_container(w, c, pod_sc, init=True)
        for c in spec.get("containers") or []:
            f += check_container(w, c, pod_sc, init=False)
            if any(p.get("name") == "grpc" for p in c.get("ports") or []):
                f += check_grpc_container(w, c, meta, spec, configmaps)
        if d["kind"] != "Deployment":
            continue
        if not any(selects(p["spec"].get("podSelector"), labels) and p["spec"].get("ingress")
                   for p in policies):
            f.append(f"{w}: no NetworkPolicy admits ingress to its pods (only default-deny covers them)")
        if not any(selects(s["spec"].get("selector") and {"matchLabels": s["spec"]["selector"]}, labels)
                   and {"grpc", "metrics"} <= {p.get("name") for p in s["spec"].get("ports") or []}
                   for s in services):
            f.append(f"{w}: no Service with ports grpc and metrics selects its pods")
        if name in ("preprocess", "inference") and not any(
                selects(p["spec"].get("selector"), labels) for p in pdbs):
            f.append(f"{w}: no PodDisruptionBudget")
        if name == "trainer":
            if d["spec"].get("replicas") != 1:
                f.append(f"{w}: replicas {d['spec'].get('replicas')}, must be 1 (one trainer per store)")
            if (d["spec"].get("strategy") or {}).get("type") != "Recreate":
                f.append(f"{w}: strategy is not Recreate (two trainers would run the same jobs)")
    return f


def load_rendered(path):
    with open(path) as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


# ---------------------------------------------------------------- self-test: planted faults

def deployment_patch(name, ops):
    return {"target": {"kind": "Deployment", "name": name}, "patch": yaml.safe_dump(ops)}


FAULTS = [
    # (name, stage expected to catch it, substring of its finding, kustomization additions)
    ("unknown key", "schema", "'runAsUsr' was unexpected",
     {"patches": [deployment_patch("preprocess", [
         {"op": "add", "path": "/spec/template/spec/containers/0/securityContext/runAsUsr", "value": 1000}])]}),
    ("wrong type", "schema", "'two' is not of type 'integer'",
     {"patches": [deployment_patch("inference", [{"op": "replace", "path": "/spec/replicas", "value": "two"}])]}),
    ("container without limits", "policy", "container preprocess: no resources.limits.cpu",
     {"patches": [deployment_patch("preprocess", [
         {"op": "remove", "path": "/spec/template/spec/containers/0/resources/limits"}])]}),
    ("runAsUser: 0", "policy", "container trainer: runAsUser 0 (root)",
     {"patches": [deployment_patch("trainer", [
         {"op": "replace", "path": "/spec/template/spec/containers/0/securityContext/runAsUser", "value": 0}])]}),
    ("privileged: true", "policy", "container inference: privileged: true",
     {"patches": [deployment_patch("inference", [
         {"op": "replace", "path": "/spec/template/spec/containers/0/securityContext/privileged", "value": True}])]}),
    ("hostPath volume", "policy", "volume tmp is a hostPath",
     {"patches": [deployment_patch("preprocess", [
         {"op": "replace", "path": "/spec/template/spec/volumes/2", "value": {"name": "tmp", "hostPath": {"path": "/tmp"}}}])]}),
    ("no readiness probe", "policy", "container inference: no readinessProbe",
     {"patches": [deployment_patch("inference", [
         {"op": "remove", "path": "/spec/template/spec/containers/0/readinessProbe"}])]}),
    ("probe with two handlers", "policy", "livenessProbe has 2 handlers",
     {"patches": [deployment_patch("trainer", [
         {"op": "add", "path": "/spec/template/spec/containers/0/livenessProbe/tcpSocket", "value": {"port": 50053}}])]}),
    ("grpc port not the configured one", "policy", "grpc port 50099 but the configuration listens on",
     {"patches": [deployment_patch("preprocess", [
         {"op": "replace", "path": "/spec/template/spec/containers/0/ports/0/containerPort", "value": 50099}])]}),
    ("no default-deny", "policy", "no default-deny NetworkPolicy",
     {"patches": [{"patch": "$patch: delete\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
                            "metadata:\n  name: default-deny\n"}]}),
    ("Deployment no policy admits", "policy", "Deployment/trainer: no NetworkPolicy admits ingress",
     {"patches": [{"patch": "$patch: delete\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
                            "metadata:\n  name: trainer-ingress\n"}]}),
    ("secret value", "policy", "a Secret in the manifests",
     {"secretGenerator": [{"name": "brats-s3-credentials", "literals": ["AWS_SECRET_ACCESS_KEY=x"],
                           "options": {"disableNameSuffixHash": True}}]}),
    ("env $(VAR) before VAR", "policy", "env BRATS_PREPROCESS_OUTPUT_ROOT refers to $(BUCKET), not defined",
     {"patches": [deployment_patch("preprocess", [
         {"op": "add", "path": "/spec/template/spec/containers/0/env/-",
          "value": {"name": "BRATS_PREPROCESS_OUTPUT_ROOT", "value": "s3://$(BUCKET)/"}},
         {"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": "BUCKET", "value": "b"}}])]}),
    ("dangling volume claim", "policy", "PersistentVolumeClaim 'brats-dta' is not in the rendering",
     {"patches": [deployment_patch("trainer", [
         {"op": "replace", "path": "/spec/template/spec/volumes/1/persistentVolumeClaim/claimName", "value": "brats-dta"}])]}),
    ("untagged image", "policy", "has no fixed tag",
     {"images": [{"name": "brats/trainer", "newTag": "latest"}]}),
]


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def selftest(kubectl, validate):
    """Copies deploy/k8s/base (and the deploy/*.toml it mirrors) to a temporary directory, plants
    each fault, and expects the named stage to report it; also plants configuration drift."""
    problems, caught = [], 0
    with tempfile.TemporaryDirectory(prefix="check-manifests-") as tmp:
        shutil.copytree(os.path.join(K8S, "base"), os.path.join(tmp, "base"))
        # The unchanged copy must pass, or the faults below prove nothing.
        baseline = os.path.join(tmp, "baseline.yaml")
        r = run([kubectl, "kustomize", os.path.join(tmp, "base"), "-o", baseline])
        clean = r.returncode == 0 and run(validate + [baseline]).returncode == 0 \
            and not check_policy(load_rendered(baseline), "baseline")
        if not clean:
            return ["self-test: the unchanged copy of the base does not pass; fix that first"]
        for i, (name, stage, expect, additions) in enumerate(FAULTS):
            d = os.path.join(tmp, f"fault{i}")
            os.mkdir(d)
            kust = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                    "resources": ["../base"]}
            kust.update(additions)
            with open(os.path.join(d, "kustomization.yaml"), "w") as fh:
                yaml.safe_dump(kust, fh)
            out = os.path.join(d, "rendered.yaml")
            r = run([kubectl, "kustomize", d, "-o", out])
            if r.returncode != 0:
                problems.append(f"self-test: fault '{name}': kustomize failed: {r.stderr.strip()}")
                continue
            if stage == "schema":
                v = run(validate + [out])
                lines = [l for l in (v.stdout + v.stderr).splitlines() if expect in l]
                ok = v.returncode != 0 and lines
            else:
                lines = [l for l in check_policy(load_rendered(out), "fault") if expect in l]
                ok = bool(lines)
            if ok:
                caught += 1
                print(f"self-test: caught '{name}' ({stage}): {lines[0].strip()}")
            else:
                problems.append(f"self-test: fault '{name}' was NOT caught by the {stage} check "
                                f"(expected a finding containing {expect!r})")
        # Drift of a configuration copy, and of the tls component's configuration.
        deploy = os.path.join(tmp, "deploy")
        shutil.copytree(os.path.join(ROOT, "deploy"), deploy,
                        ignore=shutil.ignore_patterns("docker", "compose", "*.Dockerfile"))
        with open(os.path.join(deploy, "preprocess.toml"), "a") as fh:
            fh.write("max_parallel_typo = 3\n")
        tls = os.path.join(deploy, "k8s", "components", "tls", "config", "trainer.toml")
        text = open(tls).read().replace('min_version = "1.2"', 'min_version = "1.0"')
        open(tls, "w").write(text)
        drift = check_configs(deploy, os.path.join(deploy, "k8s"))
        for name, expect in (("config copy drift", "base/config/preprocess.toml: differs from"),
                             ("tls config drift", "server.tls.min_version = '1.0'")):
            lines = [l for l in drift if expect in l]
            if lines:
                caught += 1
                print(f"self-test: caught '{name}' (configs): {lines[0]}")
            else:
                problems.append(f"self-test: fault '{name}' was NOT caught (expected {expect!r})")
    print(f"self-test: {caught} of {len(FAULTS) + 2} planted faults caught")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("configs")
    sub.add_parser("tls-configs", help="rewrite deploy/k8s/components/tls/config/*.toml")
    p = sub.add_parser("policy")
    p.add_argument("rendered", nargs="+")
    s = sub.add_parser("selftest")
    s.add_argument("--kubectl", default="kubectl")
    s.add_argument("--validate", nargs=argparse.REMAINDER, required=True,
                   help="the schema validator command; the rendered file is appended")
    a = ap.parse_args()
    if a.cmd == "tls-configs":
        write_tls_configs(os.path.join(ROOT, "deploy"), K8S)
        findings = check_configs(os.path.join(ROOT, "deploy"), K8S)
    elif a.cmd == "configs":
        findings = check_configs(os.path.join(ROOT, "deploy"), K8S)
    elif a.cmd == "policy":
        findings = []
        for path in a.rendered:
            findings += check_policy(load_rendered(path), os.path.basename(path))
    else:
        findings = selftest(a.kubectl, a.validate)
    for line in findings:
        print(line)
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
