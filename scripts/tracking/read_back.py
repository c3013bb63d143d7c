#!/usr/bin/env python3
"""Reads a training run back with the reference readers and prints one JSON object.

  read_back.py [--tensorboard DIR] [--mlflow-uri URI --experiment NAME]

--tensorboard DIR: every scalar in DIR's event files through TensorBoard's own reader
(EventAccumulator): {"tensorboard": {tag: [[step, value], ...]}}.
--mlflow-uri: the experiment's runs through MLflow's client (MlflowClient):
{"mlflow": [{"run_id", "status", "params": {...}, "metrics": {key: [[step, value], ...]},
"artifacts": [path, ...], "tags": {...}}]}.

Used by crates/brats-trainer/tests/tracking.rs; needs .deps/venv (mlflow, tensorboard).
"""
import argparse
import json
import sys


def tensorboard(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(directory, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def artifacts(client, run_id, path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        out.extend(artifacts(client, run_id, f.path) if f.is_dir else [f.path])
    return out


def mlflow_runs(uri, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = []
    for run in client.search_runs([exp.experiment_id]):
        metrics = {}
        for key in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, key)
            metrics[key] = sorted([m.step, m.value] for m in history)
        runs.append({
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "params": run.data.params,
            "tags": {k: v for k, v in run.data.tags.items() if k.startswith("brats.")},
            "metrics": metrics,
            "artifacts": sorted(artifacts(client, run.info.run_id)),
        })
    return runs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensorboard")
    p.add_argument("--mlflow-uri")
    p.add_argument("--experiment", default="brats-segresnet")
    a = p.parse_args()
    out = {}
    if a.tensorboard:
        out["tensorboard"] = tensorboard(a.tensorboard)
    if a.mlflow_uri:
        out["mlflow"] = mlflow_runs(a.mlflow_uri, a.experiment)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
