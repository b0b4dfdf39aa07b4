"""The Kubernetes manifests in launch/k8s/, checked without a cluster: each validates against its operator's own CRD
schema (vendored in launch/k8s/crds/) as the API server would with strict field validation, and runs the command
the train image runs (launch/Dockerfile's entry point and default arguments, the ones container.sh smoke runs)."""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

from conftest import ROOT  # noqa: E402

K8S = ROOT / "launch" / "k8s"
CRDS = {("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
        ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
        ("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_inferenceservices.yaml"}
MANIFESTS = {"trainjob.yaml": "TrainJob", "pytorchjob.yaml": "PyTorchJob", "inferenceservice.yaml": "InferenceService"}
TRAINING = ("trainjob.yaml", "pytorchjob.yaml")


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused, as `kubectl apply` does by default (field validation Strict):
    a CRD's structural schema would otherwise let a misspelt field through (the API server prunes it)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_schema(api_version: str, kind: str) -> dict:
    crd = yaml.safe_load((K8S / "crds" / CRDS[api_version, kind]).read_text())
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return strict(served["schema"]["openAPIV3Schema"])


def schema_errors(manifest: dict) -> list[str]:
    schema = crd_schema(manifest["apiVersion"], manifest["kind"])
    # OpenAPI v3.0's schema dialect is JSON Schema draft 4's (a boolean exclusiveMinimum, for one).
    validator = jsonschema.Draft4Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def train_container(manifest: dict) -> dict:
    """What runs the trainer: a TrainJob's `trainer`, a PyTorchJob worker's container."""
    if manifest["kind"] == "TrainJob":
        return manifest["spec"]["trainer"]
    (container,) = manifest["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    return container


def pod_of_patch(trainjob: dict) -> dict:
    (patch,) = trainjob["spec"]["runtimePatches"]
    (patched_job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return patched_job["template"]["spec"]["template"]["spec"]


def image_default_command(target: str = "train") -> list[str]:
    """ENTRYPOINT + CMD of one stage of launch/Dockerfile (exec form), what `docker run IMAGE` runs."""
    stage, found = None, {}
    for line in (ROOT / "launch" / "Dockerfile").read_text().splitlines():
        if m := re.match(r"FROM \S+ AS (\S+)", line):
            stage = m.group(1)
        elif stage == target and (m := re.match(r"(ENTRYPOINT|CMD) (\[.*\])$", line)):
            found[m.group(1)] = json.loads(m.group(2))
    return found["ENTRYPOINT"] + found["CMD"]


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_validates_against_its_crd(name: str) -> None:
    manifest = load(name)
    assert manifest["kind"] == MANIFESTS[name]
    assert schema_errors(manifest) == []


@pytest.mark.parametrize("name,edit,needle", [
    ("trainjob.yaml", lambda m: m["spec"]["trainer"].update(numNodes="two"), "'two' is not of type 'integer'"),
    ("trainjob.yaml", lambda m: m["spec"]["trainer"].update(numNode=2), "'numNode' was unexpected"),
    ("trainjob.yaml", lambda m: m["spec"].pop("runtimeRef"), "'runtimeRef' is a required property"),
    ("pytorchjob.yaml", lambda m: m["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="2"),
     "'2' is not of type 'integer'"),
    ("pytorchjob.yaml", lambda m: train_container(m).update(comand=["torchrun"]), "'comand' was unexpected"),
    ("inferenceservice.yaml", lambda m: m["spec"]["predictor"]["model"]["modelFormat"].pop("name"),
     "'name' is a required property"),
    ("inferenceservice.yaml", lambda m: m["spec"]["predictor"]["model"].update(storageURI="pvc://x"),
     "'storageURI' was unexpected"),
])
def test_a_broken_manifest_fails_validation(name: str, edit, needle: str) -> None:
    manifest = copy.deepcopy(load(name))
    edit(manifest)
    errors = schema_errors(manifest)
    assert any(needle in e for e in errors), errors


@pytest.mark.parametrize("name", TRAINING)
def test_the_job_runs_the_images_command_with_flags_the_trainer_takes(name: str) -> None:
    from torch.distributed.run import get_args_parser
    from distributed.config import build_parser
    container = train_container(load(name))
    entrypoint, *cmd = image_default_command()
    assert container["command"] == [entrypoint]
    assert re.fullmatch(r"\S+/mnist-ddp:train", container["image"]), "the image container.sh builds, pushed"
    with pytest.MonkeyPatch.context() as patch:  # torchrun's defaults, not this machine's PET_* (if any)
        for name in [v for v in os.environ if v.startswith("PET_")]:
            patch.delenv(name)
        launcher = get_args_parser().parse_args(container["args"])  # torchrun's own parser
        defaults = get_args_parser().parse_args(cmd)
    assert ["-m" if launcher.module else "", launcher.training_script] == cmd
    # The rendezvous is the operator's (the PET_* it sets): the job's args must leave torchrun's flags for it alone.
    for flag in ("nnodes", "node_rank", "master_addr", "master_port", "rdzv_backend", "rdzv_endpoint", "rdzv_id",
                 "standalone", "max_restarts"):
        assert getattr(launcher, flag) == getattr(defaults, flag), flag
    build_parser().parse_args(launcher.training_script_args)  # exits (2) on a flag the trainer does not know


def test_trainjob_leaves_the_rendezvous_to_the_operator() -> None:
    """The torch-distributed runtime's webhook refuses PET_* in a TrainJob; its patch must name the runtime's
    trainer container (`node`) to be merged into it, and ask for as many processes as GPUs per node."""
    job = load("trainjob.yaml")
    trainer = job["spec"]["trainer"]
    assert not [e for e in trainer.get("env", []) if e["name"].startswith("PET_")]
    assert not [c for c in pod_of_patch(job)["containers"] if "env" in c], "the webhook refuses env for `node`"
    runtime = yaml.safe_load((K8S / "crds" / "torch_distributed.yaml").read_text())
    assert job["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"] == "torch-distributed"
    (node_job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    runtime_containers = {c["name"] for c in node_job["template"]["spec"]["template"]["spec"]["containers"]}
    (patch,) = job["spec"]["runtimePatches"]
    (patched_job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = pod_of_patch(job)
    assert patched_job["name"] == node_job["name"]
    assert {c["name"] for c in pod["containers"]} <= runtime_containers
    assert trainer["numProcPerNode"] == trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]
    mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "persistentVolumeClaim" in volumes[mounts["/mnt/shared"]]
    args = trainer["args"]
    assert args[args.index("--run-dir") + 1].startswith("/mnt/shared/")
    assert args[args.index("--data-dir") + 1].startswith("/mnt/shared/")


def test_pytorchjob_names_its_container_as_the_v1_operator_requires() -> None:
    assert train_container(load("pytorchjob.yaml"))["name"] == "pytorch"


def test_vendored_crds_say_where_they_came_from() -> None:
    readme = (K8S / "crds" / "README.md").read_text()
    for path in (K8S / "crds").glob("*.yaml"):
        assert path.name in readme
    assert re.findall(r"\b[0-9a-f]{40}\b", readme)
    assert "Apache License" in (K8S / "crds" / "LICENSE").read_text()


def test_the_inference_service_serves_the_triton_repository_of_the_trainjobs_export() -> None:
    """On the Triton runtime (which takes the onnx format), from the PersistentVolumeClaim the TrainJob trains on,
    at the folder `python -m export --run-dir RUN_DIR --triton` writes."""
    from export.triton import REPOSITORY
    model = load("inferenceservice.yaml")["spec"]["predictor"]["model"]
    runtime = yaml.safe_load((K8S / "crds" / "kserve-tritonserver.yaml").read_text())
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    job = load("trainjob.yaml")
    pod = pod_of_patch(job)
    (claim,) = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    args = job["spec"]["trainer"]["args"]
    run_dir = Path(args[args.index("--run-dir") + 1]).relative_to("/mnt/shared")
    assert model["storageUri"] == f"pvc://{claim}/{run_dir}/export/{REPOSITORY}"
