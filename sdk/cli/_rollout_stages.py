"""``edgeship rollout``'s stages: --shadow, --split and ground truth in probation."""

from __future__ import annotations

import argparse

from agent.errors import ConfigError
from agent.messages.desired import ProbationRule, PromotionRule
from sdk.fleet._ab import SplitPlan

__all__ = ["probation_rule", "shadow_rule", "split_plan", "stage_options"]


def shadow_rule(args: argparse.Namespace) -> PromotionRule | None:
    """The ``--shadow`` stage's rule. Raises: ConfigError (a value out of range)."""
    if not args.shadow:
        return None
    try:
        return PromotionRule(
            min_samples=args.shadow_min_samples,
            min_agreement=args.shadow_min_agreement,
            max_latency_ratio=args.shadow_max_latency_ratio,
            sample_rate=args.shadow_sample_rate,
            max_seconds=args.shadow_max_seconds,
            min_accuracy=args.shadow_min_accuracy,
            min_feedback=args.shadow_min_feedback,
        )
    except ValueError as e:
        raise ConfigError(f"--shadow: {e}") from None


def probation_rule(args: argparse.Namespace) -> ProbationRule | None:
    """Ground truth in each device's probation. Raises: ConfigError (out of range)."""
    if args.probation_min_accuracy is None:
        return None
    try:
        return ProbationRule(args.probation_min_accuracy, args.probation_min_feedback)
    except ValueError as e:
        raise ConfigError(f"--probation-min-accuracy: {e}") from None


def split_plan(args: argparse.Namespace) -> SplitPlan | None:
    """The ``--split`` stage's plan. Raises: ConfigError (a value out of range)."""
    if args.split is None:
        return None
    return SplitPlan(
        share=args.split,
        min_requests=args.split_min_requests,
        max_error_increase=args.split_max_error_increase,
        max_latency_ratio=args.split_max_latency_ratio,
        max_accuracy_drop=args.split_max_accuracy_drop,
        min_labels=args.split_min_labels,
    )


def stage_options(p: argparse.ArgumentParser) -> None:
    """A stage before the candidate serves everyone: --shadow or --split (docs/fleet.md)."""
    rule, plan = PromotionRule(), SplitPlan(share=0.5)
    shadow = p.add_argument_group("shadow stage: each device decides by the rule")
    shadow.add_argument(
        "--shadow",
        action="store_true",
        help="run the candidate beside the serving version on a sample of live requests;"
        " each device promotes it or rejects it (a rejection halts the rollout)",
    )
    for name, kind, default, what in (
        ("min-samples", int, rule.min_samples, "sampled requests before a verdict"),
        ("min-agreement", float, rule.min_agreement, "share of answers agreeing with serving"),
        ("max-latency-ratio", float, rule.max_latency_ratio, "median latency vs serving"),
        ("sample-rate", float, rule.sample_rate, "share of live requests copied"),
        ("max-seconds", float, rule.max_seconds, "reject without a verdict after (0: never)"),
        ("min-accuracy", float, rule.min_accuracy, "accuracy on feedback (default: not checked)"),
        ("min-feedback", int, rule.min_feedback, "labels needed to check the accuracy"),
    ):
        shadow.add_argument(
            f"--shadow-{name}", type=kind, default=default, help=f"{what} (default: %(default)s)"
        )
    probation = p.add_argument_group("probation: ground truth from feedback")
    probation.add_argument(
        "--probation-min-accuracy",
        type=float,
        metavar="A",
        help="roll a device back when its candidate, in probation, is right on fewer than A"
        " (0-1) of its labelled answers (default: not checked)",
    )
    probation.add_argument(
        "--probation-min-feedback",
        type=int,
        default=20,
        help="labels needed before that is judged (default: %(default)s)",
    )
    split = p.add_argument_group("A/B split: the fleet compares candidate and serving")
    split.add_argument(
        "--split",
        type=float,
        metavar="SHARE",
        help="serve the candidate to SHARE (0-1) of each device's requests, then promote or"
        " reject it on the numbers (a rejection halts the rollout); needs a collector on --db",
    )
    for name, kind, default, what in (
        ("min-requests", int, plan.min_requests, "candidate requests per device before deciding"),
        ("max-error-increase", float, plan.max_error_increase, "error rate above serving's"),
        ("max-latency-ratio", float, plan.max_latency_ratio, "p95 vs serving's"),
        ("max-accuracy-drop", float, plan.max_accuracy_drop, "accuracy below serving's"),
        ("min-labels", int, plan.min_labels, "labels each version needs to compare accuracy"),
    ):
        split.add_argument(
            f"--split-{name}", type=kind, default=default, help=f"{what} (default: %(default)s)"
        )
