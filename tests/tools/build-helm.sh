#!/usr/bin/env bash
# Builds helm (for the chart tests) and prints its path; cached by version.
exec bash "$(dirname "$0")/go-tool.sh" helm helm.sh/helm/v3/cmd/helm@v3.22.0
