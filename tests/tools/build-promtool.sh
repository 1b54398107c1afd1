#!/usr/bin/env bash
# Builds promtool (checks and unit-tests the chart's alert rules) and prints
# its path; cached by version.
exec bash "$(dirname "$0")/go-tool.sh" promtool github.com/prometheus/prometheus/cmd/promtool@v0.316.0
