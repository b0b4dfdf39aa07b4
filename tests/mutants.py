"""Hand-made mutants: break one thing in the product code, run the tests that should notice, report the kill rate.

    python tests/mutants.py               # every mutant (about 15 minutes on 2 cores)
    python tests/mutants.py sync_buffers  # the mutants whose name contains this

Each mutant is one textual change that a plausible bug or a switched-off feature would make. A mutant is
killed when its tests fail. The working tree is restored after each one (and on Ctrl-C).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (file, original text, mutated text, pytest selection)
MUTANTS: dict[str, tuple[str, str, str, str]] = {
    "sync_buffers_off": ("distributed/comms.py", "    if env.is_distributed:\n        for buffer", "    if False:\n        for buffer",
                         "tests/test_torchrun.py -k record"),
    "eval_shard_unclamped": ("distributed/sampling.py", "torch.arange(min(rank, n), n", "torch.arange(rank, n",
                             "tests/test_torchrun.py -k three_ranks"),
    "images_done_unclamped": ("distributed/sampling.py", "return min(steps * self.global_batch, self.images)",
                              "return steps * self.global_batch", "tests/test_torchrun.py -k three_ranks"),
    "weight_without_world_size": ("distributed/sampling.py", "self.world_size / len(block), block)",
                                  "1 / len(block), block)", "tests/test_sampling.py -k mean_gradient"),
    "loss_mean_per_micro_batch": ("distributed/engine.py",
                                  'reduction="sum", label_smoothing=setup.label_smoothing) * weight',
                                  "label_smoothing=setup.label_smoothing)", "tests/test_global_batch.py -k same_steps"),
    "no_sync_off": ("distributed/engine.py", "return net.no_sync() if skip and isinstance(net, DDP) else nullcontext()",
                    "return nullcontext()", "tests/test_global_batch.py -k all_reduces"),
    "shares_contiguous": ("distributed/sampling.py", "mine = block[self.rank::ranks] if",
                          "mine = block.tensor_split(max(ranks, 1))[self.rank] if",
                          "tests/test_sampling.py -k distributed_samplers"),
    "epoch_restarts_on_every_resume": ("distributed/checkpoint.py", "restarted = run.step_in_epoch > 0 and other_steps",
                                       "restarted = run.step_in_epoch > 0",
                                       "tests/test_global_batch.py -k sigterm"),
    "global_batch_from_the_new_world": ("distributed/build.py", 'return state["config"]["global_batch_size"]',
                                        "return cfg.batch_size * world_size", "tests/test_global_batch.py -k sigterm"),
    "no_resume_ignored": ("distributed/checkpoint.py", "if cfg.resume is False or", "if False or",
                          "tests/test_train.py -k no_resume"),
    "checkpoint_every_steps_off": ("distributed/train.py", "save = cfg.checkpoint_every_steps and", "save = False and",
                                   "tests/test_train.py -k checkpoint_every_steps"),
    "autocast_off": ("distributed/engine.py", "enabled=dtype is not None)", "enabled=False)",
                     "tests/test_train.py -k amp_bf16"),
    "augment_ignored": ("distributed/train.py", "train.batch(index, self.cfg.augment)",
                        "train.batch(index, False)",
                        "tests/test_train.py -k augment"),
    "label_smoothing_ignored": ("distributed/engine.py", "label_smoothing=setup.label_smoothing)", "label_smoothing=0.0)",
                                "tests/test_train.py -k label_smoothing"),
    "torch_in_onnx_worker": ("serve_cli/pool.py", "    if runtime is None:\n        return",
                             "    import torch  # noqa\n    if runtime is None:\n        return",
                             "tests/test_serve_cli.py -k imports_no_torch"),
    "no_stop_save": ("distributed/train.py", "                if save or stopping:", "                if save:",
                     "tests/test_launch.py -k stop_signal_saves"),
    "nan_passes_gate": ("export/parity.py", "if not r[\"finite\"] or not r[\"max_abs_diff\"] <= report[\"atol\"]",
                        "if r[\"max_abs_diff\"] > report[\"atol\"]", "tests/test_export_refusals.py -k nan_model"),
    "int8_gate_ignores_accuracy": ("export/quantize.py", "    if drop > MAX_ACCURACY_DROP + 1e-9:", "    if False:",
                                   "tests/test_int8.py::test_a_model_whose_int8_fails_its_gate_exports_without_it "
                                   "tests/test_int8.py::test_the_gate_is_accuracy_and_agreement"),
    "fast_png_ignores_crc": ("serve_cli/base/images.py",
                             "        if zlib.crc32(view[pos + 4:stop - 4]) != struct.unpack_from(\">I\", data, stop - 4)[0]:",
                             "        if False:", "tests/test_decoders.py -k pillow_may_read"),
    "fast_png_shortcut_ignores_border": ("serve_cli/base/images.py",
                                         "    if pixels.shape == (SIZE, SIZE) and dark_border28(pixels):",
                                         "    if pixels.shape == (SIZE, SIZE):", "tests/test_decoders.py"),
    "dark_border_off_by_one": ("serve_cli/base/images.py", "<= EDGE28.size - EDGE28_MEDIAN_RANK - 1",
                               "<= EDGE28.size - EDGE28_MEDIAN_RANK", "tests/test_decoders.py -k border_count"),
    "grown_file_cut_short": ("serve_cli/base/images.py", "            if len(data) != size:  # it changed",
                             "            if False:  # it changed", "tests/test_decoders.py -k grew"),
    "fifo_read_blocks": ("serve_cli/base/images.py", '    getattr(os, "O_NONBLOCK", 0)', "    0",
                         "tests/test_decoders.py -k swapped"),
    "output_opened_before_listing": ("serve_cli/__main__.py", "        paths = check_inputs(args.inputs, args.recursive)\n",
                                     "        open(args.output or os.devnull, 'w').close()\n"
                                     "        paths = check_inputs(args.inputs, args.recursive)\n",
                                     "tests/test_serve_output.py -k nothing_to_predict"),
    "bare_csv_cell_with_comma": ("serve_cli/output.py", "[^,\\\"\\r\\n]*", "[^\\\"\\r\\n]*",
                                 "tests/test_output_formats.py -k bare_csv"),
    "bare_csv_formula": ("serve_cli/output.py", 'f"(?!{FORMULA_START.pattern})"', 'f"(?!\'{FORMULA_START.pattern})"',
                         "tests/test_output_formats.py -k bare_csv"),
    "dot_listing_spelled_raw": ("serve_cli/base/images.py", '    cut = 2 if top == "." else 0', "    cut = 0",
                                "tests/test_listing.py -k spelled"),
    "triton_dims_one_short": ("export/triton.py", "str(d) for d in spec[\"shape\"][1:])",
                              "str(d) for d in spec[\"shape\"][2:])", "tests/test_triton.py -k describes_the_gated_model"),
    "triton_foreign_folder_replaced": ("export/__main__.py", "    if (target.exists() or target.is_symlink()) and not ours:",
                                       "    if False:", "tests/test_triton.py -k another_model"),
    "install_removes_any_old_name": ("export/install.py",
                                     "    names = [n for n in artifacts if is_plain_name(n) and n != MANIFEST]",
                                     "    names = [n for n in artifacts if isinstance(n, str)]",
                                     "tests/test_triton.py -k never_makes"),
    "divergence_unchecked": ("distributed/train.py", "[self.stop.signal is not None, not segment.finite()]",
                             "[self.stop.signal is not None, False]", "tests/test_train_failures.py -k diverging"),
    "digest_unchecked": ("serve_cli/base/manifest.py", "    if manifest[\"digest\"] != digest(manifest):",
                         "    if False:", "tests/test_export_refusals.py -k edited_manifest"),
    "probe_unchecked": ("serve_cli/model.py", "        if expected is None:\n            return None",
                        "        if True:\n            return None", "tests/test_export_refusals.py -k fewer_classes"),
    "export_removes_foreign": ("export/install.py", "    if not is_ours(old):", "    if False:",
                               "tests/test_export_refusals.py -k someone_elses"),
    "output_may_be_input": ("serve_cli/output.py", "    if not target.exists():\n        return\n    real",
                            "    if True:\n        return\n    real", "tests/test_serve_output.py -k output_that_is_an_input"),
    "fifo_opened": ("serve_cli/base/images.py", "    size = check_regular(path).st_size\n", "    size = os.stat(path).st_size\n",
                    "tests/test_serve_inputs.py -k odd_folder"),
    "no_run_dir_lock": ("distributed/run_dir.py", "            lock.acquire()\n", "", "tests/test_startup_checks.py -k second_trainer"),
    "resume_any_flags": ("distributed/checkpoint.py", "    if conflicts:\n", "    if False:\n",
                         "tests/test_resume_refusals.py -k another_experiment"),
    "idx_unchecked": ("distributed/datasets.py", "            check_idx(path, ndim)\n", "            pass\n",
                      "tests/test_startup_checks.py -k damaged"),
    "loss_not_all_reduced": ("distributed/train.py", "comms.all_reduce_sum(loss.float().reshape(1).clone(), self.env).item() / self.env.world_size",
                             "loss.item()", "tests/test_global_batch.py -k same_steps"),
    "eval_not_all_reduced": ("distributed/evaluation.py", "    all_reduce_sum(confusion, env)\n", "",
                             "tests/test_torchrun.py -k two_rank_eval"),
    "probabilities_in_rank_order": ("distributed/evaluation.py",
                                    "        for index, probs in all_gather_objects((shard.cpu(), mine), env):\n"
                                    "            probabilities[index] = probs",
                                    "        probabilities = torch.cat([p for _, p in all_gather_objects((shard.cpu(), mine), env)])",
                                    "tests/test_tensorboard.py"),
    "mistakes_least_confident_first": ("distributed/evaluation.py", "argsort(descending=True, stable=True)",
                                       "argsort(descending=False, stable=True)", "tests/test_tensorboard.py -k gallery"),
    "precision_is_recall": ("distributed/evaluation.py", "(hits / m.sum(0).clamp(min=1)).tolist()",
                            "(hits / m.sum(1).clamp(min=1)).tolist()", "tests/test_tensorboard.py -k per_class"),
    "projector_unseeded_order": ("distributed/report.py", "subset = subset[:PROJECTOR_IMAGES].sort().values",
                                 "subset = subset[:PROJECTOR_IMAGES]", "tests/test_tensorboard.py -k projector"),
    "refit_skipped": ("distributed/checkpoint.py",
                      "        refit(scheduler, optimizer, min(done, cfg.epochs * steps_each_epoch))",
                      "        pass", "tests/test_torchrun.py -k resume_from_two"),
    "rng_not_restored": ("distributed/checkpoint.py", "            set_rng_state(state[\"rng\"][rank], device)",
                         "            pass", "tests/test_train.py -k stop_mid_epoch"),
    "checkpoint_digest_unchecked": ("distributed/checkpoint.py",
                                    "if state[\"version\"] >= 3 and state.get(\"digest\") != content_digest(state):",
                                    "if False:", "tests/test_export_refusals.py -k flipped"),
    "recorded_accuracy_unchecked": ("export/__main__.py", "    if same_set:\n", "    if False:\n",
                                    "tests/test_export_refusals.py -k recorded_accuracy"),
    "resume_on_changed_data": ("distributed/build.py", "        if changed:", "        if False:",
                               "tests/test_resume_refusals.py -k changed_folder"),
    "output_replaced": ("serve_cli/output.py", "    if writes_through(Path(path)):", "    if False:",
                        "tests/test_output_stop.py tests/test_serve_output.py -k output"),
    "batchnorm_single_kept": ("distributed/sampling.py", "single_left_out = self.min_share > 1 and",
                              "single_left_out = False and", "tests/test_batchnorm.py -k never_trains_on_one"),
    "stop_ignored_in_evaluation": ("distributed/train.py", "if stopping or comms.any_rank([self.stop.signal is not None], "
                                   "self.env)[0]:", "if stopping:", "tests/test_train_failures.py -k last_evaluation"),
    "grad_norm_of_one_tensor": ("distributed/engine.py", 'for group in optimizer.param_groups for p in group["params"]',
                                'for group in optimizer.param_groups for p in group["params"][:1]',
                                "tests/test_step_metrics.py -k grad_norm"),
    "windows_never_reset": ("distributed/metrics.py", "            out[\"mfu\"] = out[\"flops_per_second\"] / self.job_peak_flops\n"
                            "        self.open(step, images)", "            out[\"mfu\"] = out[\"flops_per_second\"] / "
                            "self.job_peak_flops", "tests/test_step_metrics.py -k add_up"),
    "data_wait_not_recorded": ("distributed/train.py", "self.parts.meter.data_time(time.perf_counter() - began)",
                               "pass", "tests/test_step_metrics.py -k add_up"),
    "peak_per_rank_on_the_cpu": ("distributed/metrics.py", "return node_peak * max(world_size // max(local_world_size, 1), 1)",
                                 "return node_peak * world_size", "tests/test_step_metrics.py -k add_up"),
    "hparams_all_alike": ("distributed/tb.py", "info.differs = info.name in apart", "info.differs = False",
                          "tests/test_tensorboard.py -k tells_runs_apart"),
    "progress_never_live": ("serve_cli/base/progress.py", "if sys.stderr.isatty() if live is None else live:",
                            "if False:", "tests/test_step_metrics.py -k terminal"),
}


def run_mutant(name: str, path: str, old: str, new: str, selection: str) -> bool:
    file = ROOT / path
    original = file.read_text()
    if original.count(old) != 1:
        raise SystemExit(f"{name}: the text to mutate is not found exactly once in {path}")
    file.write_text(original.replace(old, new))
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection.split()],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)
    finally:
        file.write_text(original)
    return proc.returncode != 0 and "no tests ran" not in proc.stdout


def main() -> int:
    chosen = {k: v for k, v in MUTANTS.items() if len(sys.argv) < 2 or sys.argv[1] in k}
    killed = []
    for name, spec in chosen.items():
        start = time.perf_counter()
        dead = run_mutant(name, *spec)
        killed += [name] if dead else []
        print(f"{'killed  ' if dead else 'SURVIVED'}  {name:<28} {time.perf_counter() - start:5.1f}s  ({spec[3]})",
              flush=True)
    print(f"{len(killed)}/{len(chosen)} mutants killed")
    return 0 if len(killed) == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
