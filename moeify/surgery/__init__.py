"""Find → plan → apply → verify: how a dense model becomes a MoE model."""

from moeify.surgery.find import FFNReport, FFNSite, SkippedSite, find_ffns
from moeify.surgery.plan import ConversionError, ConversionPlan, plan_conversion

__all__ = ["ConversionError", "ConversionPlan", "FFNReport", "FFNSite", "SkippedSite", "find_ffns", "plan_conversion"]
