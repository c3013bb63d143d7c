#!/usr/bin/env python3
"""Offline validation of Kubeflow Trainer v2 objects (apiVersion trainer.kubeflow.org/v1alpha1:
TrainJob, ClusterTrainingRuntime, TrainingRuntime) with the pydantic models of PyPI
kubeflow-trainer-api 2.3.0, the rules those models do not encode, and our policy. No cluster, no
network. Run it with a Python that has kubeflow-trainer-api==2.3.0 and PyYAML.

    validate_trainjob.py FILE...               check every YAML document of every FILE
    validate_trainjob.py --self-test FILE...   plant faults into copies of the (good) documents
                                               of FILE...; each must be reported

Findings are one line each, `FILE: doc N (KIND NAME): message` (N counts the file's non-empty
documents from 1); any finding exits 1, otherwise it prints `ok: N objects`. Documents of other
API groups (the RBAC next to a runtime, say) are skipped and counted; one without apiVersion and
kind is a finding.

Each document is checked in three steps:
1. Schema: the model of its kind. The models ignore keys they do not know and also accept
   their Python names (`runtime_ref`), which the API server would not, so every key is looked
   up among the model's wire (camelCase) names, recursively. Quantities and int-or-strings are
   wrapped in the models' oneOf classes first (a plain model_validate refuses `memory: 64Gi`
   as a bare string), and quantities must have Kubernetes' quantity syntax.
2. Kubeflow's rules from its 2.3.0 CRDs and admission webhooks: a TrainJob's name is an RFC 1035
   label of at most 63 characters; trainer.env sets none of the PET_* names the torch plugin
   owns and no name twice; runtimePatches have a domain-prefixed manager, set no env on the
   container `node`, and (when the runtime is among the documents) patch only its replicated
   jobs and containers; a runtime has at most one mlPolicy framework, and each replicated job
   labelled trainer.kubeflow.org/trainjob-ancestor-step has replicas 1 and its container
   (`node` for the trainer).
3. Our policy (steps 2 and 3 run once the types are right; unknown keys do not stop them):
   trainer.env also sets none of the names `brats-trainer node` gives its workers
   (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK); numNodes and numProcPerNode >= 1;
   resourcesPerNode with cpu and memory limits, extended resources (nvidia.com/gpu) requested
   as much as limited; runtimePatches weaken no security setting and mount no hostPath. A
   runtime has a trainer replicated job; every container of its pods sets no reserved env
   name, runs as a non-root uid, unprivileged, without privilege escalation, on a read-only
   root with a writable /tmp, drops ALL capabilities, has seccomp RuntimeDefault and cpu and
   memory requests and limits; its pods have no host namespaces or hostPath volumes, no
   service-account token and no service links (the restricted Pod Security Standard of the
   namespace brats, and deploy/k8s's conventions).
"""

import argparse
import copy
import json
import re
import sys
import types
import typing

try:
    import yaml
    from kubeflow_trainer_api import models
    from pydantic import BaseModel, ValidationError
except ImportError as e:
    sys.exit(f"validate_trainjob.py: {e.name} is missing: run it with a Python that has "
             f"kubeflow-trainer-api==2.3.0 and PyYAML")

API_VERSION = "trainer.kubeflow.org/v1alpha1"
GROUP = API_VERSION.split("/")[0]
MODELS = {
    "TrainJob": models.TrainerV1alpha1TrainJob,
    "ClusterTrainingRuntime": models.TrainerV1alpha1ClusterTrainingRuntime,
    "TrainingRuntime": models.TrainerV1alpha1TrainingRuntime,
}
RUNTIME_KINDS = ("ClusterTrainingRuntime", "TrainingRuntime")
# Set by Kubeflow's torch plugin; its webhook refuses a TrainJob whose trainer.env has them.
KUBEFLOW_RESERVED = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
# Set by `brats-trainer node` for each worker it starts.
LAUNCHER_RESERVED = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"}
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
ANCESTOR_CONTAINERS = {"trainer": "node", "dataset-initializer": "dataset-initializer",
                       "model-initializer": "model-initializer"}
FRAMEWORKS = ("torch", "mpi", "jax", "xgboost", "flux")
RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DOMAIN_PREFIXED = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/\S+$")
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?$")
BASE_RESOURCES = {"cpu", "memory", "ephemeral-storage"}
ONE_OF_NAMES = {models.IoK8sApimachineryPkgApiResourceQuantity: "quantity",
                models.IoK8sApimachineryPkgUtilIntstrIntOrString: "int or string"}


# ---------------------------------------------------------------- schema (kubeflow-trainer-api)

def join(path, key):
    return f"{path}.{key}" if path else str(key)


def loc_path(loc):
    """A pydantic error location as a path: ('spec', 'trainer', 'env', 0) -> spec.trainer.env[0]."""
    path = ""
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else join(path, part)
    return path


def unwrap(annotation):
    """The annotation without Optional[...] and Annotated[...]."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation


def is_one_of(model):
    """The generated oneOf wrappers (Quantity, IntOrString) hold their value in actual_instance."""
    return "actual_instance" in model.model_fields


def wrap_one_of(value, model, path, out):
    """A scalar as an instance of its oneOf wrapper, as the package's own from_dict builds it."""
    try:
        wrapped = model.from_json(json.dumps(value))
    except ValueError:
        out.append((path, f"{value!r} is not a valid {ONE_OF_NAMES.get(model, model.__name__)}"))
        return None
    if model is models.IoK8sApimachineryPkgApiResourceQuantity and not QUANTITY.match(str(value)):
        out.append((path, f"{value!r} is not a Kubernetes quantity (like 500m, 8, 64Gi)"))
    return wrapped


def convert_object(value, model, path, out):
    """A mapping for `model`, each key looked up by its wire name; unknown keys are reported and
    dropped (a Python name too: pydantic would accept it, the API server would not)."""
    fields = {f.alias or name: f for name, f in model.model_fields.items()}
    python_names = {name: f.alias for name, f in model.model_fields.items() if f.alias and f.alias != name}
    result = {}
    for key, item in value.items():
        where = join(path, key)
        field = fields.get(key)
        if field is None:
            hint = f" (the Python name of {python_names[key]})" if key in python_names else ""
            out.append((where, f"unknown field{hint}; {model.__name__} has no such key"))
            continue
        result[key] = convert(item, field.annotation, where, out)
    return result


def convert(value, annotation, path, out):
    """`value` shaped for model_validate against `annotation`; findings go to `out` as (path,
    message). Values of the wrong shape are left for pydantic to report."""
    annotation = unwrap(annotation)
    origin = typing.get_origin(annotation)
    if value is None:
        return None
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(annotation)
        return [convert(v, item, f"{path}[{i}]", out) for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        item = typing.get_args(annotation)[1]
        return {k: convert(v, item, join(path, k), out) for k, v in value.items()}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if is_one_of(annotation):
            return wrap_one_of(value, annotation, path, out)
        if isinstance(value, dict):
            return convert_object(value, annotation, path, out)
    return value


def schema_findings(doc, model):
    """Findings of the document against `model`, and whether its shape can be trusted."""
    found = []
    converted = convert(doc, model, "", found)
    try:
        model.model_validate(converted)
        valid = True
    except ValidationError as e:
        valid = False
        reported = {path for path, _ in found}
        for err in e.errors():
            path = loc_path(err["loc"])
            if path not in reported:  # a oneOf value already reported above
                found.append((path, err["msg"]))
    return [f"{path}: {msg}" if path else msg for path, msg in found], valid


# ---------------------------------------------------------------- helpers

def dig(obj, *keys):
    for k in keys:
        obj = obj.get(k) if isinstance(obj, dict) else None
    return obj


def env_findings(where, env):
    """Reserved and duplicate names in an env list."""
    found, seen = [], set()
    for e in env or []:
        name = e.get("name")
        if name in KUBEFLOW_RESERVED:
            found.append(f"{where}: {name} is reserved (Kubeflow's torch plugin sets it)")
        elif name in LAUNCHER_RESERVED:
            found.append(f"{where}: {name} is reserved (brats-trainer node sets it for each worker)")
        if name in seen:
            found.append(f"{where}: {name} is set twice (env is a map keyed by name)")
        seen.add(name)
    return found


def security_weakened(where, sc):
    """Explicitly unsafe values in a pod or container securityContext (partial, like a patch)."""
    found = []
    if sc.get("privileged") is True:
        found.append(f"{where}: privileged: true")
    if sc.get("runAsNonRoot") is False:
        found.append(f"{where}: runAsNonRoot: false")
    for key in ("runAsUser", "runAsGroup"):
        if sc.get(key) == 0:
            found.append(f"{where}: {key} 0 (root)")
    if sc.get("allowPrivilegeEscalation") is True:
        found.append(f"{where}: allowPrivilegeEscalation: true")
    if sc.get("readOnlyRootFilesystem") is False:
        found.append(f"{where}: readOnlyRootFilesystem: false (the root filesystem must be read-only)")
    if dig(sc, "capabilities", "add"):
        found.append(f"{where}: capabilities add {sc['capabilities']['add']}")
    if dig(sc, "seccompProfile", "type") == "Unconfined":
        found.append(f"{where}: seccompProfile Unconfined")
    return found


def security_missing(where, sc):
    """Hardening a complete container must have and does not set at all (values set wrongly are
    security_weakened's); sc: the pod's settings overridden by the container's."""
    required = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True}
    found = [f"{where}: {k} not set (must be {str(v).lower()})" for k, v in required.items() if sc.get(k) is None]
    if sc.get("runAsUser") is None:
        found.append(f"{where}: no runAsUser (the image's user would decide)")
    if "ALL" not in (dig(sc, "capabilities", "drop") or []):
        found.append(f"{where}: capabilities do not drop ALL")
    if dig(sc, "seccompProfile", "type") not in ("RuntimeDefault", "Localhost", "Unconfined"):
        found.append(f"{where}: no seccompProfile RuntimeDefault")
    return found


def resources_missing(where, resources, kinds=("requests", "limits")):
    return [f"{where}: no {kind}.{r}" for kind in kinds for r in ("cpu", "memory")
            if r not in (dig(resources, kind) or {})]


def pod_findings(where, spec):
    """Host namespaces and hostPath volumes, in a pod spec or a pod spec patch."""
    found = [f"{where}: {k}: true" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    found += [f"{where}: volume {v.get('name')} is a hostPath" for v in spec.get("volumes") or [] if "hostPath" in v]
    return found


# ---------------------------------------------------------------- TrainJob

def trainjob_findings(doc, runtimes):
    spec = doc.get("spec") or {}
    trainer = spec.get("trainer") or {}
    name = dig(doc, "metadata", "name") or ""
    found = []
    if not RFC1035.match(name) or len(name) > 63:
        found.append(f"metadata.name {name!r} is not an RFC 1035 label of at most 63 characters")
    ref = spec.get("runtimeRef") or {}
    if ref.get("apiGroup") not in (None, GROUP):
        found.append(f"spec.runtimeRef.apiGroup {ref['apiGroup']!r} is not {GROUP}")
    if ref.get("kind") not in (None, *RUNTIME_KINDS):
        found.append(f"spec.runtimeRef.kind {ref['kind']!r} is not one of {', '.join(RUNTIME_KINDS)}")
    found += env_findings("spec.trainer.env", trainer.get("env"))
    for key in ("numNodes", "numProcPerNode"):
        if trainer.get(key) is not None and trainer[key] < 1:
            found.append(f"spec.trainer.{key} {trainer[key]} (at least 1)")
    found += resources_findings(trainer.get("resourcesPerNode"))
    runtime = runtimes.get((ref.get("kind") or "ClusterTrainingRuntime", ref.get("name")))
    for i, patch in enumerate(spec.get("runtimePatches") or []):
        found += patch_findings(f"spec.runtimePatches[{i}]", patch, runtime)
    return found


def resources_findings(res):
    where = "spec.trainer.resourcesPerNode"
    if not res:
        return [f"{where}: missing (every node needs cpu and memory limits)"]
    found = resources_missing(where, res, kinds=("limits",))
    requests, limits = res.get("requests") or {}, res.get("limits") or {}
    for r in sorted(set(requests) | set(limits)):
        extended = r not in BASE_RESOURCES and not r.startswith("hugepages-")
        if extended and str(requests.get(r, limits.get(r))) != str(limits.get(r)):
            found.append(f"{where}: {r} requests {requests.get(r)} but limits {limits.get(r)} "
                         f"(an extended resource is requested exactly as limited)")
    return found


def patch_findings(where, patch, runtime):
    """A runtime patch: Kubeflow's rules, our security policy, and (when the runtime is known)
    names that exist in it."""
    found = []
    if not DOMAIN_PREFIXED.match(patch.get("manager") or ""):
        found.append(f"{where}.manager {patch.get('manager')!r} is not domain-prefixed (like brats.io/trainer)")
    known = runtime_containers(runtime) if runtime else None
    for j, rj in enumerate(dig(patch, "trainingRuntimeSpec", "template", "spec", "replicatedJobs") or []):
        rw = f"{where}.trainingRuntimeSpec.template.spec.replicatedJobs[{j}]"
        if known is not None and rj.get("name") not in known:
            found.append(f"{rw}: replicated job {rj.get('name')!r} is not in the runtime")
        pod = dig(rj, "template", "spec", "template", "spec") or {}
        found += pod_findings(rw, pod)
        found += security_weakened(f"{rw} pod securityContext", pod.get("securityContext") or {})
        for group in ("initContainers", "containers"):
            for c in pod.get(group) or []:
                cw = f"{rw} {group[:-1]} {c.get('name')}"
                if known is not None and rj.get("name") in known and c.get("name") not in known[rj["name"]]:
                    found.append(f"{cw}: not a container of the runtime's job {rj['name']}")
                if group == "containers" and c.get("name") == "node" and c.get("env"):
                    found.append(f"{cw}: env for the container node is refused in runtimePatches; use spec.trainer.env")
                found += security_weakened(cw, c.get("securityContext") or {})
    return found


# ---------------------------------------------------------------- runtimes

def replicated_jobs(doc):
    """(path, replicated job, pod spec) of each replicated job of a runtime."""
    for i, rj in enumerate(dig(doc, "spec", "template", "spec", "replicatedJobs") or []):
        yield f"spec.template.spec.replicatedJobs[{i}]", rj, dig(rj, "template", "spec", "template", "spec") or {}


def runtime_containers(doc):
    """{replicated job name: {container names}} of a runtime."""
    return {rj.get("name"): {c.get("name") for c in (pod.get("initContainers") or []) + (pod.get("containers") or [])}
            for _, rj, pod in replicated_jobs(doc)}


def runtime_findings(doc):
    policy = dig(doc, "spec", "mlPolicy") or {}
    found = []
    frameworks = [f for f in FRAMEWORKS if policy.get(f) is not None]
    if len(frameworks) > 1:
        found.append(f"spec.mlPolicy sets {', '.join(frameworks)}: only one framework may be configured")
    if policy.get("numNodes") is not None and policy["numNodes"] < 1:
        found.append(f"spec.mlPolicy.numNodes {policy['numNodes']} (at least 1)")
    trainer_jobs = 0
    for where, rj, pod in replicated_jobs(doc):
        ancestor = dig(rj, "template", "metadata", "labels", ANCESTOR_LABEL)
        trainer_jobs += ancestor == "trainer"
        found += ancestor_findings(where, rj, pod, ancestor)
        found += runtime_pod_findings(where, pod)
    if not trainer_jobs:
        found.append(f"no replicated job labelled {ANCESTOR_LABEL}: trainer "
                     f"(the TrainJob's trainer would apply nowhere)")
    return found


def ancestor_findings(where, rj, pod, ancestor):
    if ancestor not in ANCESTOR_CONTAINERS:
        return []
    found = []
    if rj.get("replicas") not in (None, 1):
        found.append(f"{where}.replicas {rj['replicas']}: a job labelled {ancestor} must have replicas 1")
    container = ANCESTOR_CONTAINERS[ancestor]
    if container not in {c.get("name") for c in pod.get("containers") or []}:
        found.append(f"{where}: labelled {ancestor} but has no container named {container}")
    return found


def runtime_pod_findings(where, pod):
    found = pod_findings(where, pod)
    if pod.get("automountServiceAccountToken") is not False:
        found.append(f"{where}: automountServiceAccountToken is not false (training pods call no Kubernetes API)")
    if pod.get("enableServiceLinks") is not False:
        found.append(f"{where}: enableServiceLinks is not false (service variables would reach the BRATS_* loader)")
    pod_sc = pod.get("securityContext") or {}
    found += security_weakened(f"{where} pod securityContext", pod_sc)
    inherited = {k: v for k, v in pod_sc.items()
                 if k in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")}
    for group in ("initContainers", "containers"):
        for c in pod.get(group) or []:
            cw = f"{where} {group[:-1]} {c.get('name')}"
            sc = {**inherited, **(c.get("securityContext") or {})}
            found += security_weakened(cw, sc) + security_missing(cw, sc)
            found += resources_missing(cw, c.get("resources"))
            found += env_findings(f"{cw} env", c.get("env"))
            if group == "containers" and not any(m.get("mountPath") == "/tmp" for m in c.get("volumeMounts") or []):
                found.append(f"{cw}: no writable /tmp (mount an emptyDir; the root filesystem is read-only)")
    return found


# ---------------------------------------------------------------- documents

def describe(doc):
    return f"{doc.get('kind')} {dig(doc, 'metadata', 'name')}"


def is_kubeflow(doc):
    return isinstance(doc, dict) and str(doc.get("apiVersion", "")).split("/")[0] == GROUP


def check_document(doc, runtimes):
    """All findings of one Kubeflow Trainer document; `runtimes` maps (kind, name) to the runtimes
    among the documents, for the TrainJobs' cross-references."""
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") not in MODELS:
        return [f"apiVersion {doc.get('apiVersion')!r}, kind {doc.get('kind')!r}: expected {API_VERSION} "
                f"and one of {', '.join(MODELS)}"]
    found, valid = schema_findings(doc, MODELS[doc["kind"]])
    if valid:
        found += trainjob_findings(doc, runtimes) if doc["kind"] == "TrainJob" else runtime_findings(doc)
    return found


def load(paths):
    """[(file, n, document)] of the non-empty documents, and findings for unreadable files."""
    docs, found = [], []
    for path in paths:
        try:
            with open(path) as fh:
                items = [d for d in yaml.safe_load_all(fh) if d is not None]
        except (OSError, yaml.YAMLError) as e:
            found.append(f"{path}: not readable YAML: {e}")
            continue
        docs += [(path, n, d) for n, d in enumerate(items, 1)]
    return docs, found


def runtimes_of(docs):
    return {(d["kind"], dig(d, "metadata", "name")): d for _, _, d in docs
            if is_kubeflow(d) and d.get("kind") in RUNTIME_KINDS}


def check(paths):
    docs, found = load(paths)
    runtimes = runtimes_of(docs)
    checked = skipped = 0
    for path, n, doc in docs:
        if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
            found.append(f"{path}: doc {n}: not a Kubernetes object (no apiVersion and kind)")
            continue
        if not is_kubeflow(doc):
            skipped += 1
            continue
        checked += 1
        found += [f"{path}: doc {n} ({describe(doc)}): {m}" for m in check_document(doc, runtimes)]
    for line in found:
        print(line)
    if not found:
        note = f" ({skipped} documents of other API groups skipped)" if skipped else ""
        print(f"ok: {checked} objects{note}")
    return 1 if found else 0


# ---------------------------------------------------------------- self-test: planted faults

def node_container(doc):
    """The runtime's trainer container (`node` of the job labelled trainer)."""
    for _, rj, pod in replicated_jobs(doc):
        if dig(rj, "template", "metadata", "labels", ANCESTOR_LABEL) == "trainer":
            return next((c for c in pod.get("containers") or [] if c.get("name") == "node"), None)
    return None


def privileged_patch(doc):
    """A runtime patch that makes the trainer container privileged."""
    container = {"name": "node", "securityContext": {"privileged": True}}
    pod = {"template": {"spec": {"template": {"spec": {"containers": [container]}}}}}
    rjs = {"template": {"spec": {"replicatedJobs": [{"name": "node", **pod}]}}}
    doc["spec"].setdefault("runtimePatches", []).append({"manager": "brats.io/self-test", "trainingRuntimeSpec": rjs})


def plant_trainjob(fault, doc):
    """Plants `fault` in a TrainJob; returns the text its finding must contain."""
    trainer = doc["spec"].setdefault("trainer", {})
    if fault == "unknown field":
        trainer["numProcsPerNode"] = 2
        return "spec.trainer.numProcsPerNode: unknown field"
    if fault == "Python field name":
        doc["spec"]["runtime_ref"] = doc["spec"].pop("runtimeRef")
        return "spec.runtime_ref: unknown field (the Python name of runtimeRef)"
    if fault == "missing runtimeRef":
        del doc["spec"]["runtimeRef"]
        return "spec.runtimeRef: Field required"
    if fault == "numNodes 0":
        trainer["numNodes"] = 0
        return "spec.trainer.numNodes 0 (at least 1)"
    if fault == "wrong type":
        trainer["numNodes"] = "2"
        return "spec.trainer.numNodes: Input should be a valid integer"
    if fault == "reserved env name":
        trainer.setdefault("env", []).append({"name": "PET_NODE_RANK", "value": "0"})
        return "PET_NODE_RANK is reserved"
    if fault == "privileged container":
        privileged_patch(doc)
        return "container node: privileged: true"
    if fault == "no limits":
        trainer.setdefault("resourcesPerNode", {}).pop("limits", None)
        return "spec.trainer.resourcesPerNode: no limits.cpu"
    if fault == "malformed quantity":
        trainer.setdefault("resourcesPerNode", {}).setdefault("limits", {})["memory"] = "128 GB"
        return "'128 GB' is not a Kubernetes quantity"
    return None


def plant_runtime(fault, doc):
    """Plants `fault` in a runtime's trainer container or policy; returns the expected text."""
    node = node_container(doc)
    if node is None:
        return None
    sc = node.setdefault("securityContext", {})
    if fault == "unknown field":
        sc["runAsUsr"] = 0
        return "securityContext.runAsUsr: unknown field"
    if fault == "numNodes 0":
        doc["spec"].setdefault("mlPolicy", {})["numNodes"] = 0
        return "spec.mlPolicy.numNodes 0 (at least 1)"
    if fault == "privileged container":
        sc["privileged"] = True
        return "container node: privileged: true"
    if fault == "root user":
        sc["runAsUser"] = 0
        return "container node: runAsUser 0 (root)"
    if fault == "writable root filesystem":
        sc["readOnlyRootFilesystem"] = False
        return "container node: readOnlyRootFilesystem: false"
    if fault == "no limits":
        node.setdefault("resources", {}).pop("limits", None)
        return "container node: no limits.cpu"
    if fault == "no trainer container":
        node["name"] = "trainer"
        return "labelled trainer but has no container named node"
    return None


FAULTS = ("unknown field", "Python field name", "missing runtimeRef", "numNodes 0", "wrong type",
          "reserved env name", "privileged container", "root user", "writable root filesystem",
          "no limits", "malformed quantity", "no trainer container")


def plant(fault, doc):
    return plant_trainjob(fault, doc) if doc["kind"] == "TrainJob" else plant_runtime(fault, doc)


def self_test(paths):
    """Each fault planted, one at a time, into a copy of every document it applies to; each must be
    reported with its expected text, and each must have been planted at least once."""
    docs, found = load(paths)
    docs = [(p, n, d) for p, n, d in docs if is_kubeflow(d) and d.get("kind") in MODELS]
    runtimes = runtimes_of(docs)
    found += [f"{p}: doc {n} ({describe(d)}): {m}" for p, n, d in docs for m in check_document(d, runtimes)]
    if found or not docs:
        print("\n".join(found) or "self-test: no TrainJob or runtime among the documents")
        print("self-test: the given documents must pass unchanged first")
        return 1
    problems, caught = [], 0
    for fault in FAULTS:
        planted = 0
        for path, n, doc in docs:
            bad = copy.deepcopy(doc)
            expect = plant(fault, bad)
            if expect is None:
                continue
            planted += 1
            hits = [m for m in check_document(bad, runtimes) if expect in m]
            where = f"{path}: doc {n} ({describe(doc)})"
            if hits:
                caught += 1
                print(f"self-test: caught '{fault}' in {where}: {hits[0]}")
            else:
                problems.append(f"self-test: '{fault}' planted in {where} was NOT caught (expected {expect!r})")
        if not planted:
            problems.append(f"self-test: '{fault}' applies to none of the documents (pass a TrainJob and a runtime)")
    print("\n".join(problems) if problems else f"self-test: all {caught} planted faults caught")
    return 1 if problems else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--self-test", action="store_true", help="plant faults into copies of the documents")
    ap.add_argument("files", nargs="+", metavar="FILE")
    a = ap.parse_args()
    sys.exit(self_test(a.files) if a.self_test else check(a.files))


if __name__ == "__main__":
    main()
