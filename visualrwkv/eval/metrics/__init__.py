"""Official metrics of the evaluation benchmarks (SPEC §8).

    vqa        VQA accuracy with answer normalisation (VQAv2, TextVQA, VizWiz)
    gqa        exact match after normalisation
    scienceqa  option-letter accuracy, overall and on image questions (SQA-IMG)
    pope       accuracy / precision / recall / F1 / yes-ratio per split
    mme        per-subtask accuracy and accuracy+, perception and cognition scores
    mmbench    circular multiple choice (MMBench, MMBench-CN)
    submission files for the evaluation servers (VQAv2, VizWiz, MMBench)

Each scorer returns a ``Score``; ``visualrwkv.eval.score`` is the command line around them.
"""
from visualrwkv.eval.metrics.common import Score, load_answers, parse_option_letter
from visualrwkv.eval.metrics.gqa import load_gqa_annotations, normalize_gqa_answer, score_gqa
from visualrwkv.eval.metrics.mmbench import score_mmbench
from visualrwkv.eval.metrics.mme import load_mme_ground_truth, parse_mme_answer, score_mme
from visualrwkv.eval.metrics.pope import load_pope_labels, parse_pope_answer, pope_metrics, score_pope
from visualrwkv.eval.metrics.scienceqa import load_scienceqa_annotations, score_scienceqa
from visualrwkv.eval.metrics.submission import (vizwiz_submission, vqav2_submission, write_mmbench_submission,
                                                write_xlsx)
from visualrwkv.eval.metrics.vqa import load_vqa_annotations, normalize_vqa_answer, score_vqa, vqa_accuracy

__all__ = [
    "Score", "load_answers", "parse_option_letter",
    "normalize_vqa_answer", "vqa_accuracy", "load_vqa_annotations", "score_vqa",
    "normalize_gqa_answer", "load_gqa_annotations", "score_gqa",
    "load_scienceqa_annotations", "score_scienceqa",
    "parse_pope_answer", "pope_metrics", "load_pope_labels", "score_pope",
    "parse_mme_answer", "load_mme_ground_truth", "score_mme",
    "score_mmbench",
    "vqav2_submission", "vizwiz_submission", "write_mmbench_submission", "write_xlsx",
]
