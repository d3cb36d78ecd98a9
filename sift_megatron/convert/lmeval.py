"""`sift eval`: lm-evaluation-harness on an exported model directory.

The bundled offline task (tasks/sift_offline_mc.yaml + .jsonl) runs anywhere; harness tasks need their
datasets from the Hugging Face hub. When every requested task is bundled, the hub is switched off
(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) so nothing is even attempted.

Open LLM Leaderboard (v1) tasks, on a machine with network, each with its leaderboard few-shot count:
    sift eval DIR --tasks arc_challenge  --num-fewshot 25   # ARC-Challenge, report acc_norm
    sift eval DIR --tasks hellaswag      --num-fewshot 10   # HellaSwag, acc_norm
    sift eval DIR --tasks mmlu           --num-fewshot 5    # MMLU (57 subjects), acc
    sift eval DIR --tasks truthfulqa_mc2 --num-fewshot 0    # TruthfulQA MC2, acc
    sift eval DIR --tasks winogrande     --num-fewshot 5    # Winogrande, acc
Scores are float32 log-likelihoods of the exported model (the padded vocabulary rows are not part of it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sift_megatron.errors import SiftError, first_line

TASKS_DIR = Path(__file__).with_name("tasks")
LM_EVAL_PIN = "lm-eval==0.4.13 accelerate==1.15.0"

# Open LLM Leaderboard (v1) tasks and their few-shot counts: run each with its own --num-fewshot.
OPEN_LLM_TASKS = {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0, "winogrande": 5}


def bundled_tasks() -> dict[str, Path]:
    """name -> YAML of the tasks shipped in sift_megatron/convert/tasks."""
    import yaml

    out = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        name = (yaml.safe_load(path.read_text()) or {}).get("task")
        if name:
            out[name] = path
    return out


def bundled_task_config(path: Path) -> dict:
    """The task YAML as a config dict, with its local data files made absolute (datasets resolves relative
    paths against the working directory, not the YAML)."""
    import yaml

    cfg = yaml.safe_load(path.read_text())
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        cfg["dataset_kwargs"]["data_files"] = {k: str((path.parent / v).resolve()) for k, v in files.items()}
    elif isinstance(files, str):
        cfg["dataset_kwargs"]["data_files"] = str((path.parent / files).resolve())
    return cfg


def _check_model_dir(hf_dir: Path) -> None:
    if not hf_dir.is_dir():
        raise SiftError(f"model directory '{hf_dir}' not found (create it with `sift convert`)")
    if not (hf_dir / "config.json").is_file():
        raise SiftError(f"'{hf_dir}' has no config.json: not a transformers model directory")
    if not (hf_dir / "tokenizer.json").is_file() and not (hf_dir / "tokenizer_config.json").is_file():
        raise SiftError(f"'{hf_dir}' has no tokenizer (exported from a mock-data run?); lm-eval needs one")


def run_eval(hf_dir: str | os.PathLike, tasks: list[str], *, limit: int | float | None = None,
             batch_size: int | str = 1, num_fewshot: int | None = None, device: str | None = None,
             output: str | os.PathLike | None = None, seed: int = 1234) -> dict:
    """Evaluate `hf_dir` on `tasks`; returns lm-eval's results dict (with per-sample logs) and writes it as
    JSON to `output` when given."""
    hf_dir = Path(hf_dir)
    _check_model_dir(hf_dir)
    if not tasks:
        raise SiftError("--tasks is empty: name at least one task (e.g. sift_offline_mc)")
    local = bundled_tasks()
    if all(t in local for t in tasks):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sift_megatron.extras import require

    require("sift eval", "lm_eval", "accelerate", "transformers")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise SiftError(f"lm-eval is not usable ({e}); install it with: pip install {LM_EVAL_PIN}") from None
    import torch

    import sift_megatron.convert  # noqa: F401  (sift_gpt is registered once transformers is imported)
    from sift_megatron.convert import register_auto_classes

    register_auto_classes()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars; lm-eval's own progress stays
    need_defaults = any(t not in local for t in tasks)
    manager = TaskManager(verbosity="ERROR", include_defaults=need_defaults)
    if need_defaults:
        import difflib

        known = set(manager.all_tasks) | set(local)
        for t in tasks:
            if t not in known:
                near = difflib.get_close_matches(t, sorted(known), n=3)
                hint = f" (did you mean {', '.join(near)}?)" if near else ""
                raise SiftError(f"unknown lm-eval task '{t}'{hint}")
    specs = [bundled_task_config(local[t]) if t in local else t for t in tasks]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from safetensors import SafetensorError

    try:
        lm = HFLM(pretrained=str(hf_dir), backend="causal", device=device, dtype="float32",
                  batch_size=batch_size, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise SiftError(f"cannot load the model in '{hf_dir}': {first_line(e)}") from None
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=specs, num_fewshot=num_fewshot, limit=limit,
                                          log_samples=True, task_manager=manager, verbosity="ERROR",
                                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                          fewshot_random_seed=seed)
    except OSError as e:  # datasets: ConnectionError / DatasetNotFoundError / missing data files
        raise SiftError(f"cannot load the data of --tasks {','.join(tasks)}: {first_line(e)} (harness tasks "
                        "need the Hugging Face hub; sift_offline_mc runs offline)") from None
    if results is None:  # only on non-zero ranks of a multi-process run
        return {}
    if output:
        from lm_eval.utils import handle_non_serializable

        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
        os.replace(tmp, out)
    return results


def results_table(results: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(results)
