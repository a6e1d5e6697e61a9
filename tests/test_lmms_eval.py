"""The lmms-eval plugin, through the real, unmodified lmms-eval CLI in subprocesses (offline).

The reference is vidtok's own `vidtok eval` on the same samples and method: the plugin must give
the same prediction for every sample, single-process and data-parallel (2 CPU processes).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import lmms_eval  # noqa: F401
except ImportError:  # the README's setup line installs it; a missing install is a failure, not a skip
    lmms_eval = None

from vidtok.testbed.toy import ASSETS

TASKS = Path(__file__).resolve().parents[1] / "src" / "vidtok" / "integrations" / "lmms_tasks"
DATA = TASKS / "vidtok_synth" / "data"
MAIN, ASSISTANT = ASSETS / "toy-main", ASSETS / "toy-assistant"
# Static VisionZip at 12.5% answers some of these and misses others: a discriminating comparison.
ARGS = f"pretrained={MAIN},method=visionzip,guide=none,retention=0.125,frames=16"
GUIDED = f"pretrained={MAIN},assistant={ASSISTANT},method=visionzip,guide=assistant,retention=0.0625,frames=16"


def _env(tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TOKENIZERS_PARALLELISM="false")
    env.pop("VIDTOK_SYNTH_SPLIT", None)
    return env


def _lmms(tmp_path, launcher, model_args, out, extra_env=None, timeout=600, batch=1):
    command = [
        *launcher, "--model", "vidtok", "--model_args", f"{model_args},plan_log={out / 'plans.jsonl'}",
        "--tasks", "vidtok_synth", "--include_path", str(TASKS), "--batch_size", str(batch),
        "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    env = _env(tmp_path) | (extra_env or {})
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)


def _samples(out, done=None) -> dict[int, dict]:
    files = list(out.rglob("*_samples_vidtok_synth.jsonl"))
    # lmms-eval exits 0 after a failed evaluation: its own output is the only account of why
    said = "" if done is None else "\nlmms-eval said:\n" + done.stdout[-2000:] + done.stderr[-3000:]
    assert len(files) == 1, f"expected one sample log under {out}, found {files}{said}"
    rows = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
    by_id = {row["doc_id"]: row for row in rows}
    assert len(by_id) == len(rows), "a sample was logged twice"
    return by_id


def _results(out) -> dict:
    files = list(out.rglob("*_results.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def _plans(out) -> list[dict]:
    return [json.loads(line) for f in sorted(out.glob("plans*.jsonl")) for line in f.read_text().splitlines() if line.strip()]


def _vidtok_eval(tmp_path, retention=0.125, guides="none", count=8):
    """`vidtok eval` on the shipped split: {question id: prediction}, accuracy."""
    out = tmp_path / "vidtok-eval"
    command = [
        sys.executable, "-m", "vidtok.cli", "eval", str(DATA), "--model", str(MAIN),
        *(["--assistant", str(ASSISTANT)] if "assistant" in guides else []),  # refused where no guide reads it
        "--methods", "visionzip", "--guides", guides, "--retentions", str(retention), "--limit", str(count),
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr
    folder = out / f"visionzip-{guides}-r{retention:g}"
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((folder / "results.json").read_text())
    return {row["id"]: row["prediction"] for row in rows}, summary["accuracy"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    assert lmms_eval is not None, "lmms-eval is not installed: run the README's setup line"
    return _vidtok_eval(tmp_path_factory.mktemp("ref"))


def _check_against(reference, out, done=None):
    predictions, accuracy = reference
    samples = _samples(out, done)
    assert sorted(samples) == list(range(8)), "every shipped question exactly once"
    questions = [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines()]
    for doc_id, row in samples.items():
        assert row["filtered_resps"].split()[0] == predictions[questions[doc_id]["id"]], f"doc {doc_id}"
        assert row["accuracy"] == float(row["filtered_resps"].split()[0] == row["target"])
    reported = _results(out)["results"]["vidtok_synth"]["accuracy,none"]
    assert reported == pytest.approx(accuracy)
    return samples


def test_single_process_equals_vidtok_eval_sample_by_sample(reference, tmp_path):
    assert 0 < reference[1] < 1, "the comparison must include right and wrong answers"
    out = tmp_path / "single"
    done = _lmms(tmp_path, [sys.executable, "-m", "lmms_eval"], ARGS, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = _check_against(reference, out, done)
    plans = _plans(out)
    assert sorted(p["doc_id"] for p in plans) == list(range(8))
    for plan in plans:
        assert plan["method"] == "visionzip" and plan["guide"] is None
        assert sum(plan["budgets"]) == plan["total_budget"] == plan["visual_tokens_kept"] == 32
        assert [len(k) for k in plan["kept"]] == plan["budgets"]
        assert plan["answer"] == samples[plan["doc_id"]]["filtered_resps"]
    for row in samples.values():  # prompt = text + the kept visual tokens + the video's newline
        assert row["token_counts"][0]["input_tokens"] > 32 and 1 <= row["token_counts"][0]["output_tokens"] <= 2


def test_batch_size_four_answers_as_batch_size_one(reference, tmp_path):
    out = tmp_path / "batched"
    done = _lmms(tmp_path, [sys.executable, "-m", "lmms_eval"], ARGS, out, batch=4)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _check_against(reference, out, done)
    plans = _plans(out)
    assert sorted(p["doc_id"] for p in plans) == list(range(8)) and all(p["batch_size"] == 4 for p in plans)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHERS = {
    # torchrun starts one process per rank; lmms-eval sees WORLD_SIZE and gathers over gloo
    "torchrun": lambda port: ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port)],
    # `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.15); --multi_gpu
    # starts two, and with no GPU each runs on the CPU
    "accelerate": lambda port: ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)],
}  # fmt: skip


@pytest.mark.parametrize("launcher, batch", [(name, 1) for name in sorted(LAUNCHERS)] + [("torchrun", 3)])
def test_two_processes_gather_the_single_process_result(reference, tmp_path, launcher, batch):
    out = tmp_path / "dp"
    done = _lmms(tmp_path, [sys.executable, *LAUNCHERS[launcher](_free_port()), "-m", "lmms_eval"], ARGS, out, batch=batch)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _check_against(reference, out, done)
    logs = done.stdout + done.stderr
    assert "Running on rank 0" in logs and "Running on rank 1" in logs, "two processes must really run"
    ranks = {f.name: {json.loads(line)["doc_id"] for line in f.read_text().splitlines()} for f in out.glob("plans*.jsonl")}
    assert set(ranks) == {"plans.rank0.jsonl", "plans.rank1.jsonl"}
    assert not ranks["plans.rank0.jsonl"] & ranks["plans.rank1.jsonl"], "each sample answered by one rank only"
    assert ranks["plans.rank0.jsonl"] | ranks["plans.rank1.jsonl"] == set(range(8))


def test_guided_run_reports_dytok_plans(tmp_path):
    assert lmms_eval is not None, "lmms-eval is not installed: run the README's setup line"
    out = tmp_path / "guided"
    done = _lmms(tmp_path, [sys.executable, "-m", "lmms_eval"], GUIDED + ",layers=1", out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    questions = [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines()]
    for plan in _plans(out):
        assert plan["guide"] == "assistant" and plan["guide_layers"] == [1]
        assert sum(plan["budgets"]) == plan["total_budget"] == 16
        weights = plan["frame_weights"]
        assert len(weights) == 16 and abs(sum(weights) - 1) < 1e-5
        # the assistant's prior points at the asked needle's frame (the shipped pair is trained for it)
        needle = questions[plan["doc_id"]]["needle_frame"]
        assert plan["budgets"][needle] == max(plan["budgets"])


def test_fastv_with_the_inline_prior_runs_inside_lmms_eval(tmp_path):
    assert lmms_eval is not None, "lmms-eval is not installed: run the README's setup line"
    out = tmp_path / "fastv"
    done = _lmms(tmp_path, [sys.executable, "-m", "lmms_eval"], f"pretrained={MAIN},method=fastv,guide=inline,retention=0.125,frames=16,layer=2", out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    plans = _plans(out)
    assert len(plans) == 8
    for plan in plans:
        assert plan["guide"] == "inline" and plan["layer"] == 2 and plan["guide_layers"] == [1]
        assert sum(plan["budgets"]) == plan["total_budget"] == plan["visual_tokens_kept"] == 32


BAD = [
    ("method=visionzip,guide=inline", "use method=fastv"),
    ("method=visionzip+fastv", "needs vision_retention"),
    ("method=fastv,vision_retention=0.5", "vision_retention= sets the encoder's share before FastV, which applies to ENCODER+fastv"),
    ("method=visionzip,layer=3", "layer= sets FastV's layer (tokens are dropped from it on), which applies to fastv and ENCODER+fastv"),
    ("method=visionzip,seed=3", "seed= sets the random compressor's draw"),
    ("guide=self,assistant=toy-assistant", "assistant= sets the assistant model, which applies to guide assistant"),
    ("method=fastv,layer=0", "layer=0 must be a positive integer"),
    ("retention=2", "retention=2"),
    ("methd=visionzip", "unknown key(s) ['methd']"),
    ("method=fastvv", "method='fastvv' is unknown"),
    ("guide=assistant", "guide=assistant needs assistant="),
    ("frames=0", "frames=0 must be a positive integer"),
    ("batch_size=auto", "give --batch_size a whole number >= 1"),
    ("layers=1.5", "cannot read layers '1.5'"),
    ("layers=a", "cannot read layers 'a'"),
    ("layers=1-2-3", "cannot read layers '1-2-3'"),
    ("cap=True", "cap=True must be a positive integer"),
    ("guide=self,cap=4,floor=5", "floor=5 exceeds cap=4"),
    ("guide_pool=0", "guide_pool=0 must be a positive integer"),
    ("max_new_tokens=0", "max_new_tokens=0 must be a positive integer"),
    ("plan_log=/proc/x/p.jsonl", "plan_log='/proc/x/p.jsonl'"),
    ("guide=none,cap=4", "cap= sets the most tokens a unit keeps, which applies to guide self, assistant or inline, not to visionzip (guide none)"),
    ("guide_stride=0", "guide_stride=0 must be a positive integer"),
    ("method=fastv,guide=inline,guide_stride=2", "guide_stride= sets the guide's view of every k-th unit, which applies to guide self or assistant"),
    ("method=fastv,guide=inline,guide_pool=2", "guide_pool= sets the guide's pooled view of each unit, which applies to guide self or assistant"),
]


def _counting_loads(monkeypatch):
    import vidtok.integrations.lmms_eval as plugin

    loads, real = [], plugin._load
    monkeypatch.setattr(plugin, "_load", lambda name: (loads.append(name), real(name))[1])
    return loads


@pytest.mark.parametrize("extra,message", BAD, ids=[b[0] for b in BAD])
def test_bad_model_args_fail_before_loading_with_one_line(extra, message, monkeypatch):
    assert lmms_eval is not None, "lmms-eval is not installed: run the README's setup line"
    from vidtok.integrations.lmms_eval import ModelArgsError, VidtokLMM

    loads = _counting_loads(monkeypatch)
    with pytest.raises(ModelArgsError) as error:
        VidtokLMM.create_from_arg_string(f"pretrained={MAIN},{extra}")
    assert message in str(error.value.code) and "\n" not in str(error.value.code)
    assert loads == [], "refused only after a model loaded"


# What only the loaded model can tell (its depth, its tokens per frame): refused right after
# loading, before lmms-eval's first request, instead of a traceback inside the evaluation.
BAD_FOR_THE_MODEL = [
    ("guide=self,layers=7", "guide layer 7 is outside the guide's 4 layers"),
    (f"assistant={ASSISTANT},guide=assistant,layers=3", "guide layer 3 is outside the guide's 2 layers"),
    ("method=fastv,guide=inline,layers=2", "inline layers must be below it"),
    ("method=fastv,layer=4", "FastV's layer 4 is outside 1..3"),
    ("guide=self,cap=99", "cap=99 exceeds the 16 tokens"),
    ("guide=self,floor=100", "floor=100 exceeds the 16 tokens"),
    ("guide=self,floor=3,retention=0.125,frames=16", "floor=3 x frames=16 = 48 exceeds the budget of 32 tokens"),
    ("guide=self,cap=1,retention=0.125,frames=16", "budget of 32 tokens exceeds frames=16 x cap=1"),
    ("method=fastv,guide=self,floor=3,retention=0.125,frames=16", "floor=3 x frames=16 = 48 exceeds the budget of 32 tokens"),
]


@pytest.mark.parametrize("extra,message", BAD_FOR_THE_MODEL, ids=[b[0] for b in BAD_FOR_THE_MODEL])
def test_model_args_the_model_cannot_serve_fail_at_startup_with_one_line(extra, message):
    assert lmms_eval is not None, "lmms-eval is not installed: run the README's setup line"
    from vidtok.integrations.lmms_eval import ModelArgsError, VidtokLMM

    with pytest.raises(ModelArgsError) as error:
        VidtokLMM.create_from_arg_string(f"pretrained={MAIN},{extra}")
    assert message in str(error.value.code) and "\n" not in str(error.value.code)


@pytest.mark.parametrize("extra", ["guide=self,layers=1;3,cap=8,floor=1", "method=fastv,guide=inline,layers=1", f"assistant={ASSISTANT},layers=0-1",
                                   "method=visionzip+fastv,vision_retention=0.5,guide=inline,floor=1", "method=full", "guide=self,floor=2"])
def test_model_args_that_fit_the_model_are_accepted(extra, tmp_path):
    from vidtok.integrations.lmms_eval import VidtokLMM

    VidtokLMM.create_from_arg_string(f"pretrained={MAIN},{extra},frames=16,plan_log={tmp_path / 'new' / 'plans.jsonl'}")
    assert (tmp_path / "new").is_dir()


def test_missing_checkpoint_names_the_folder():
    from vidtok.integrations.lmms_eval import ModelArgsError, ModelArgs

    with pytest.raises(ModelArgsError, match="no config.json"):
        ModelArgs.parse({"pretrained": "/no/such/checkpoint"})


@pytest.mark.parametrize("extra, said", [("retention=1.5", ["retention=1.5", "(0, 1]"]), ("guide=self,cap=99", ["cap=99 exceeds the 16 tokens"])],
                         ids=["before loading", "after loading"])
def test_bad_args_through_the_cli_exit_non_zero_without_a_traceback(tmp_path, extra, said):
    assert lmms_eval is not None, "lmms-eval is not installed: run the README's setup line"
    done = _lmms(tmp_path, [sys.executable, "-m", "lmms_eval"], f"pretrained={MAIN},{extra}", tmp_path / "bad", timeout=300)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    assert all(s in done.stderr for s in said), done.stderr[-2000:]
    assert not (tmp_path / "bad" / "plans.jsonl").exists()


def test_a_family_whose_tokens_per_unit_depend_on_the_video_is_checked_where_it_can_be(tmp_path):
    """Qwen2.5-VL: tokens per temporal group follow each video's resolution, so the budget checks
    wait for the samples; the depth checks do not."""
    import json as _json

    from vidtok.integrations.lmms_eval import ModelArgsError, VidtokLMM
    from vidtok.models import adapter_for
    from vidtok.testbed.toy import build_qwen_toy_model, build_tokenizer

    folder = tmp_path / "qwen"
    model = build_qwen_toy_model("test", seed=0)
    model.save_pretrained(folder)
    build_tokenizer("qwen2_5_vl").save_pretrained(folder)
    (folder / "video_preprocessor_config.json").write_text(_json.dumps({"size": {"shortest_edge": 64 * 64, "longest_edge": 64 * 64}}))
    depth = adapter_for(model).num_layers
    VidtokLMM.create_from_arg_string(f"pretrained={folder},method=visionzip,guide=self,floor=1,cap=8,frames=8")
    with pytest.raises(ModelArgsError, match=f"guide layer {depth} is outside the guide's {depth} layers"):
        VidtokLMM.create_from_arg_string(f"pretrained={folder},method=visionzip,guide=self,layers={depth},frames=8")
