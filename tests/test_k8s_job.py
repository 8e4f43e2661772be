"""deploy/k8s-indexed-job.yaml: a Kubernetes Indexed Job whose pods each run one
shard. The manifest is checked as Kubernetes would read it, then its command is run
for indices 0 and 1 (as the Job controller would set them) against the sandbox."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.cli import main
from pipeline.expand import expand
from pipeline.journal import load_state
from pipeline.manifest import load_manifest
from pipeline.shard import Shard

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "k8s-indexed-job.yaml"


def documents() -> dict[str, dict[str, Any]]:
    with DEPLOY.open() as f:
        return {doc["kind"]: doc for doc in yaml.safe_load_all(f)}


def expand_refs(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command and args ($$ is a literal $)."""
    return re.sub(
        r"\$\$|\$\((\w+)\)",
        lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]),
        text,
    )


def test_the_job_is_an_indexed_job_of_n_shards_with_its_key_and_volume() -> None:
    """completions = N of auto/N, Indexed, a PVC mounted where the run dirs are,
    the key from a Secret, and an index-specific run dir per pod."""
    docs = documents()
    job, claim = docs["Job"], docs["PersistentVolumeClaim"]
    assert (job["apiVersion"], claim["apiVersion"]) == ("batch/v1", "v1")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy needs it
    (container,) = pod["containers"]
    args = container["args"]
    shard = args[args.index("--shard") + 1]
    count = int(shard.removeprefix("auto/"))
    assert shard.startswith("auto/")
    assert spec["completions"] == count
    assert 1 <= spec["parallelism"] <= count
    run_dir = args[args.index("--run-dir") + 1]
    assert "$(JOB_COMPLETION_INDEX)" in run_dir
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (mount,) = container["volumeMounts"]
    assert mount["name"] == volume["name"]
    assert run_dir.startswith(mount["mountPath"].rstrip("/") + "/")
    env = {e["name"]: e for e in container["env"]}
    assert env["RUNWARE_API_KEY"]["valueFrom"]["secretKeyRef"]["key"]
    index_ref = env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert "batch.kubernetes.io/job-completion-index" in index_ref
    assert [e["name"] for e in container["env"]].index("JOB_COMPLETION_INDEX") == 0
    rules = {
        r["action"]: r["onExitCodes"]["values"]
        for r in spec["podFailurePolicy"]["rules"]
    }
    assert rules == {"FailJob": [2], "FailIndex": [1]}
    assert "backoffLimitPerIndex" in spec  # FailIndex needs it


def test_two_pods_run_disjoint_shards_that_cover_the_job(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The container's command, run as pods 0 and 1 (JOB_COMPLETION_INDEX set as
    the Job controller sets it), in its working dir, its volume a temp dir, against
    the sandbox: disjoint shards, together every task of the job; status and
    gallery over both show the whole job."""
    for name in ("RUNWARE_API_KEY", "REMIX_BASE_URL", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    job = documents()["Job"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mount = container["volumeMounts"][0]["mountPath"].rstrip("/")
    assert container["workingDir"] == "/app"
    monkeypatch.chdir(REPO)  # the image holds this repo at /app
    volume = tmp_path / "volume"
    run_dirs: list[Path] = []
    for index in range(job["spec"]["completions"]):
        env = {"JOB_COMPLETION_INDEX": str(index)}
        argv = [
            expand_refs(a, env) for a in [*container["command"], *container["args"]]
        ]
        assert argv[0] == "remix"
        argv = [
            a.replace(mount, str(volume), 1) if a.startswith(mount) else a for a in argv
        ]
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
        assert main([*argv[1:], "--sandbox"]) == 0, capsys.readouterr()
        run_dirs.append(Path(argv[argv.index("--run-dir") + 1]))
    capsys.readouterr()
    assert run_dirs == [volume / "nightly" / "shard-0", volume / "nightly" / "shard-1"]

    manifest = load_manifest(REPO / container["args"][2])
    every_key = {spec.key for spec in expand(manifest)}
    done = [load_state(d / "journal.jsonl").done_keys for d in run_dirs]
    assert not done[0] & done[1]
    assert done[0] | done[1] == every_key
    for index, run_dir in enumerate(run_dirs):
        assert json.loads((run_dir / "run.json").read_text())["shard"] == f"{index}/2"
        assert all(Shard(index, 2).contains(key) for key in done[index])

    assert main(["status", *map(str, run_dirs), "--format", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["state"], status["done"]) == ("finished", len(every_key))
    assert main(["gallery", *map(str, run_dirs)]) == 0
    assert capsys.readouterr().out.strip() == str(
        volume / "nightly" / "nightly-gallery.html"
    )
