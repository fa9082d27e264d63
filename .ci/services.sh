#!/usr/bin/env bash
# Services the test suite needs beyond Python packages. Nothing yet.
exit 0
