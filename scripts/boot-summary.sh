#!/usr/bin/env bash
# Sums up the boot ledger the real-VM tests wrote (HUSK_BOOT_LEDGER, see
# hypervisor/src/ledger.rs): how many guests the suite booted, how many of
# them reached their agent, and the seconds spent booting. Fails when the
# suite booted more guests than BUDGET: on a host where a boot costs 300 s,
# twelve boots are what CI's 90 minutes leave room for (README.md, Tests).
#
# Usage: scripts/boot-summary.sh LEDGER [BUDGET]
set -euo pipefail
ledger=${1:?usage: $0 LEDGER [BUDGET]}
budget=${2:-12}
[ -f "$ledger" ] || { echo "boot-summary: no ledger at $ledger: no guest was booted" >&2; exit 1; }
awk -v budget="$budget" '
    $1 == "start" { starts++ }
    $1 == "ready" { ready++; secs += $3; if ($3 > slowest) slowest = $3 }
    $1 == "restore" { restores++ }
    $1 == "restored" { restored++; rsecs += $3; if ($3 > rslowest) rslowest = $3 }
    END {
        printf "== guest boots: %d (%d reached their agent), %.0f s booting in all, slowest %.1f s, budget %d\n",
            starts, ready, secs, slowest, budget
        # Restores skip the guest boot: counted apart, not in the budget.
        printf "== restores from snapshots: %d (%d reached their agent), %.1f s in all, slowest %.3f s\n",
            restores, restored, rsecs, rslowest
        # A VM stopped before its agent came up (the shim killed during its
        # boot) costs seconds, not a boot: only full boots count.
        if (ready > budget) {
            printf "boot-summary: %d full guest boots is over the budget of %d\n", ready, budget > "/dev/stderr"
            exit 1
        }
    }' "$ledger"
