"""The feedback loop (issue 14): answers -> behaviour -> online metrics per model version -> the
canary's decision. Plain Python; the services compose it."""
