#!/usr/bin/env bash
# Builds CoreDNS (cluster DNS for the test node: Kiln's pods reach the
# operator and Redis by Service name) and prints its path; cached by version.
exec bash "$(dirname "$0")/../tools/go-tool.sh" coredns github.com/coredns/coredns@v1.11.3
