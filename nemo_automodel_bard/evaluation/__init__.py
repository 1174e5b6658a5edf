"""Evaluating Bard-VL with lmms-eval: a model plugin (:mod:`.lmms_eval_plugin`, registered through the
``lmms_eval.models`` entry point as ``bard_vl``), its lmms-eval-free core (:mod:`.batched`) and a tiny local
task (:mod:`.tiny_task`). See ``docs/evaluation.md``."""
