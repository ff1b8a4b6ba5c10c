"""The Kubeflow Trainer launcher against a loopback HTTP stub of the Kubernetes API."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from unitoken.pipeline.cluster import cluster_from_dict
from unitoken.pipeline.trainjob import Cancelled, TrainJobFailed, TrainJobLauncher, trainjob_body

PREFIX = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/unitoken/trainjobs"
RUNNING = {"conditions": [{"type": "Suspended", "status": "False", "reason": "Resumed"}]}
COMPLETE = {"conditions": [{"type": "Complete", "status": "True", "reason": "JobSetCompleted", "message": "all done"}]}
FAILED = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                          "message": "node-0-0 exited with code 1"}]}


class KubeStub:
    """Enough of the API server for TrainJobs: create (409 on a taken name), get, list by label,
    watch (scripted statuses), delete. ``existing`` are jobs of earlier attempts, each with its
    own fixed status."""

    def __init__(self, timeline: list[dict], existing: dict[str, tuple[dict, dict]] | None = None):
        self.timeline, self.pos = timeline, 0
        self.objects: dict[str, dict] = {}
        self.fixed: dict[str, dict] = {}  # name -> status of an earlier attempt's job
        for name, (labels, status) in (existing or {}).items():
            self.objects[name] = {"metadata": {"name": name, "labels": labels, "resourceVersion": "1",
                                               "creationTimestamp": f"2026-12-0{len(self.objects) + 1}T00:00:00Z"}}
            self.fixed[name] = status
        self.requests: list[tuple[str, str]] = []
        self.deleted: list[tuple[str, dict]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def _send(self, code, doc):
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                stub.requests.append(("POST", self.path))
                obj = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if obj["metadata"]["name"] in stub.objects:
                    return self._send(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"})
                obj["metadata"]["resourceVersion"] = "1"
                stub.objects[obj["metadata"]["name"]] = obj
                self._send(201, obj)

            def do_GET(self):
                url = urlparse(self.path)
                query = parse_qs(url.query)
                stub.requests.append(("GET", self.path))
                if [w.lower() for w in query.get("watch", [])] == ["true"]:
                    return self._watch(query)
                name = url.path.rsplit("/", 1)[-1]
                if name == "trainjobs":  # a list, by label selector
                    want = dict(kv.split("=", 1) for kv in query.get("labelSelector", [""])[0].split(",") if kv)
                    items = [stub.current(n) for n, o in stub.objects.items()
                             if want.items() <= o["metadata"].get("labels", {}).items()]
                    return self._send(200, {"kind": "TrainJobList", "items": items, "metadata": {}})
                if name not in stub.objects:
                    return self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                self._send(200, stub.current(name))

            def _watch(self, query):
                name = query["fieldSelector"][0].split("=", 1)[1]
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                deadline = time.time() + int(query.get("timeoutSeconds", ["5"])[0])
                while time.time() < deadline:
                    if stub.pos + 1 < len(stub.timeline):
                        stub.pos += 1
                        line = json.dumps({"type": "MODIFIED", "object": stub.current(name)}) + "\n"
                        self.wfile.write(line.encode())
                        self.wfile.flush()
                    time.sleep(0.05)

            def do_DELETE(self):
                stub.requests.append(("DELETE", self.path))
                name = urlparse(self.path).path.rsplit("/", 1)[-1]
                length = int(self.headers.get("Content-Length") or 0)
                options = json.loads(self.rfile.read(length)) if length else {}
                options.update({k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()})
                stub.deleted.append((name, options))
                stub.objects.pop(name, None)
                self._send(200, {"kind": "Status", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def current(self, name):
        obj = dict(self.objects[name])
        obj["status"] = self.fixed.get(name, self.timeline[self.pos])
        obj["metadata"] = {**obj["metadata"], "resourceVersion": str(self.pos + 1)}
        return obj

    def launcher(self) -> TrainJobLauncher:
        from kubernetes import client

        cfg = client.Configuration(host=f"http://127.0.0.1:{self.server.server_address[1]}")
        return TrainJobLauncher("unitoken", api_client=client.ApiClient(cfg), watch_timeout_s=2)


CLUSTER = cluster_from_dict({
    "image": "ghcr.io/acme/unitoken:1", "namespace": "unitoken", "checkpoint_pvc": "ckpt", "queue": "gpu-queue",
    "env": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
    "secrets": [{"name": "unitoken-s3", "env": {"access-key": "AWS_ACCESS_KEY_ID"}}],
    "image_pull_secrets": ["ghcr-pull"],
    "gpu": {"gpus": 8, "node_selector": {"pool": "h200"}, "workload_priority_class": "training",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    "steps": {"train-stage2": {"num_nodes": 4, "cpu": "96", "memory": "1000Gi"}},
})


def _body(name="uni-stage2"):  # attempts are named <name>-a<N>
    return trainjob_body(name, "train-stage2", ["torchrun", "-m", "unitoken.cli", "train", "--stage", "2"], CLUSTER,
                         labels={"unitoken.ai/job": "run-1"})


@pytest.fixture
def stub_factory():
    stubs = []

    def make(timeline, existing=None):
        stubs.append(KubeStub(timeline, existing))
        return stubs[-1]

    yield make
    for s in stubs:
        s.server.shutdown()


def test_body_carries_the_steps_placement():
    """numNodes, per-node resources, runtime, node selector, tolerations, PVC, env and secrets."""
    body = _body()
    spec = body["spec"]
    assert spec["runtimeRef"] == {"name": "unitoken-deepspeed", "kind": "TrainingRuntime", "apiGroup": "trainer.kubeflow.org"}
    assert spec["trainer"]["numNodes"] == 4
    assert spec["trainer"]["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8", "cpu": "96", "memory": "1000Gi"}
    env = {e["name"]: e for e in spec["trainer"]["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "unitoken-s3", "key": "access-key"}
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
        "template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "h200"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "ckpt"
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/mnt/checkpoints"
    assert pod["imagePullSecrets"] == [{"name": "ghcr-pull"}]  # the Trainer's pods pull from the same registry
    labels = body["metadata"]["labels"]  # Kueue's label names a WorkloadPriorityClass
    assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue" and labels["kueue.x-k8s.io/priority-class"] == "training"


def test_create_and_watch_to_success(stub_factory):
    """The job is created in the namespace and followed until Complete."""
    stub = stub_factory([RUNNING, RUNNING, COMPLETE])
    name, reason = stub.launcher().run(_body(), timeout_s=30)
    assert "JobSetCompleted" in reason and name == "uni-stage2-a1"
    assert ("POST", PREFIX) in stub.requests
    assert any("watch=true" in path.lower() for method, path in stub.requests if method == "GET")
    assert stub.objects["uni-stage2-a1"]["spec"]["trainer"]["numNodes"] == 4
    assert stub.deleted == []


def test_watch_to_failure_carries_the_reason(stub_factory):
    """A Failed condition fails the step with the job's reason and message."""
    stub = stub_factory([RUNNING, FAILED])
    with pytest.raises(TrainJobFailed, match="BackoffLimitExceeded: node-0-0 exited with code 1"):
        stub.launcher().run(_body(), timeout_s=30)
    assert stub.deleted == []  # a failed job is left for its logs


def test_timeout_cancels_the_job(stub_factory):
    """Past the step's timeout the TrainJob is deleted (foreground) and the step fails."""
    stub = stub_factory([RUNNING])
    with pytest.raises(TimeoutError):
        stub.launcher().run(_body(), timeout_s=1)
    assert stub.deleted and stub.deleted[0][0] == "uni-stage2-a1"
    assert stub.deleted[0][1].get("propagationPolicy") == "Foreground"


def test_cancelling_the_step_deletes_the_job(stub_factory):
    """SIGTERM (KFP cancelling the step) while watching deletes the TrainJob, then re-raises."""
    stub = stub_factory([RUNNING])
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    with pytest.raises(Cancelled):
        stub.launcher().run(_body(), timeout_s=60)
    timer.join()
    assert [d[0] for d in stub.deleted] == ["uni-stage2-a1"]
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def test_deleted_job_fails_the_step(stub_factory):
    """A job deleted by someone else while the step waits fails the step clearly."""
    stub = stub_factory([RUNNING, RUNNING])
    launcher = stub.launcher()
    launcher.create(_body())
    stub.objects.clear()
    with pytest.raises(TrainJobFailed, match="was deleted"):
        launcher.wait("uni-stage2", timeout_s=10)


def test_stage_on_trainer_stages_inputs_and_runs_a_valid_command(tmp_path):
    """The multi-node step copies its inputs to the shared volume and launches `unitoken train` with
    arguments the CLI accepts; without a hand-off on the volume afterwards it fails, never publishes."""
    from unitoken.cli import build_parser
    from unitoken.model.handoff import HandoffError
    from unitoken.pipeline import steps

    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "index.json").write_text("{}")
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "config.json").write_text("{}")
    seen = {}

    class FakeLauncher:
        def run(self, body, timeout_s):
            seen["body"], seen["timeout"] = body, timeout_s
            return body["metadata"]["name"] + "-a1", "JobSetCompleted"

    with pytest.raises(HandoffError):
        runs_on = steps.RunsOn("trainjob", job="0b6f7e3c-3d1a-4a57-9a43-5bd1f0c2e8aa", cluster_doc=CLUSTER.to_json(),
                               launcher=FakeLauncher())
        steps.train_stage(2, "tiny", ["train.seed=3"], tmp_path / "tokens", tmp_path / "init", tmp_path / "out",
                          tmp_path / "pvc" / "job" / "stage2", "run123", runs_on, max_steps=5)
    cmd = seen["body"]["spec"]["trainer"]["command"]
    assert cmd[:3] == ["torchrun", "-m", "unitoken.cli"]
    args = build_parser().parse_args(cmd[3:])
    assert (args.stage, args.recipe, args.max_steps, args.overrides) == (2, "tiny", 5, ["train.seed=3"])
    assert (tmp_path / "pvc/job/stage2/inputs/tokens/index.json").is_file()
    assert (tmp_path / "pvc/job/stage2/inputs/init/config.json").is_file()
    env = {e["name"]: e.get("value") for e in seen["body"]["spec"]["trainer"]["env"]}
    assert env["MLFLOW_PARENT_RUN_ID"] == "run123"
    name = seen["body"]["metadata"]["name"]
    assert len(name) <= 63 and name[0].isalpha() and name == name.lower()
    assert not (tmp_path / "out").exists()


LABELS = {"unitoken.ai/job": "run-1", "unitoken.ai/step": "train-stage2"}


def _run_body(name="uni-stage2"):
    return trainjob_body(name, "train-stage2", ["torchrun"], CLUSTER, labels={"unitoken.ai/job": "run-1"})


def test_a_retry_after_a_failed_job_starts_a_new_one(stub_factory):
    """The failed attempt's job stays for its logs; the retry creates <name>-a2 and follows it."""
    stub = stub_factory([RUNNING, COMPLETE], existing={"uni-stage2-a1": (LABELS, FAILED)})
    name, _ = stub.launcher().run(_run_body(), timeout_s=30)
    assert name == "uni-stage2-a2" and set(stub.objects) == {"uni-stage2-a1", "uni-stage2-a2"}
    assert stub.deleted == []


def test_a_retry_adopts_the_running_job_of_the_attempt_that_died(stub_factory):
    """A watcher pod that died left its TrainJob running: the retry follows that job, creates none."""
    stub = stub_factory([RUNNING], existing={"uni-stage2-a1": (LABELS, RUNNING)})
    stub.fixed.pop("uni-stage2-a1")  # it follows the timeline from here
    stub.timeline.append(COMPLETE)
    name, reason = stub.launcher().run(_run_body(), timeout_s=30)
    assert name == "uni-stage2-a1" and "JobSetCompleted" in reason
    assert not [r for r in stub.requests if r[0] == "POST"]


def test_a_taken_name_is_adopted_not_a_failure(stub_factory):
    """A 409 on create (another attempt created the name between list and create) adopts that job."""
    stub = stub_factory([RUNNING, COMPLETE])
    launcher = stub.launcher()
    launcher.list = lambda labels: []  # the list was taken before the other attempt's create
    stub.objects["uni-stage2-a1"] = {**_run_body(), "metadata": {"name": "uni-stage2-a1", "labels": LABELS}}
    assert launcher.run(_run_body(), timeout_s=30)[0] == "uni-stage2-a1"
    assert ("POST", PREFIX) in stub.requests  # it tried, got 409, and adopted


def test_other_runs_jobs_are_not_adopted(stub_factory):
    """Jobs of another run (another unitoken.ai/job label) are never touched."""
    other = {"unitoken.ai/job": "run-2", "unitoken.ai/step": "train-stage2"}
    stub = stub_factory([RUNNING, COMPLETE], existing={"uni-stage2-a1": (other, RUNNING)})
    with pytest.raises(TrainJobFailed, match="belongs to another run"):  # a name clash is an error, not an adoption
        stub.launcher().run(_run_body(), timeout_s=30)
    assert stub.deleted == []


def test_the_launcher_uses_only_the_verbs_rbac_grants(stub_factory):
    """Every request the launcher makes maps to a verb in trainjob.VERBS (what the Role must grant)."""
    from unitoken.pipeline.trainjob import VERBS

    stub = stub_factory([RUNNING], existing={"uni-stage2-a1": (LABELS, FAILED)})
    with pytest.raises(TimeoutError):
        stub.launcher().run(_run_body(), timeout_s=1)
    used = set()
    for method, path in stub.requests:
        q = parse_qs(urlparse(path).query)
        named = urlparse(path).path.rsplit("/", 1)[-1] != "trainjobs"
        used.add({"POST": "create", "DELETE": "delete"}.get(method) or
                 ("watch" if q.get("watch") else "get" if named else "list"))
    assert used == set(VERBS)


def test_staged_inputs_are_reused_only_when_their_digest_matches(tmp_path):
    """A retry reuses the staged copy of the same input; a different input (same run key, new
    data) or a copy whose stamp is missing (cut off mid-copy) is staged again."""
    from unitoken.pipeline.steps import stage_input

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_text("one")
    dest = tmp_path / "pvc" / "inputs" / "tokens"
    assert stage_input(src, dest, "d1") == dest and (dest / "a.bin").read_text() == "one"
    (dest / "marker").write_text("kept")
    stage_input(src, dest, "d1")
    assert (dest / "marker").is_file()  # same digest: the copy is reused
    (src / "a.bin").write_text("two")
    stage_input(src, dest, "d2")
    assert (dest / "a.bin").read_text() == "two" and not (dest / "marker").exists()
    dest.with_name("tokens.sha256").unlink()
    (dest / "marker").write_text("stale")
    stage_input(src, dest, "d2")
    assert not (dest / "marker").exists()
