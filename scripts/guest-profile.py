#!/usr/bin/env python3
"""Where a guest spent its time, from a profile the shim wrote with
HUSK_GUEST_PROFILE=<dir> (one `<sandbox>.<shim pid>.samples` file per sandbox).

    scripts/guest-profile.py build/guest/vmlinux DIR/ID.PID.samples [FUNCTION...]

Prints three views of the samples:
  - by cause: the timer interrupt, a kernel worker, a system call (by name),
    a page fault, user code, idle;
  - leaf functions (where the vCPU was);
  - for each FUNCTION named: the share of samples with it on the stack.
Callers come from a guessing unwinder (kernel text addresses found on the
stack), so inclusive shares are estimates; leaf shares are exact.
"""

import bisect
import collections
import re
import subprocess
import sys


def load_symbols(vmlinux):
    out = subprocess.run(["nm", "-n", vmlinux], check=True, capture_output=True, text=True).stdout
    symbols = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in "tTwW":
            symbols.append((int(parts[0], 16), parts[2]))
    symbols.sort()
    return [a for a, _ in symbols], [n for _, n in symbols]


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    addrs, names = load_symbols(sys.argv[1])

    def name(addr):
        i = bisect.bisect_right(addrs, addr) - 1
        return names[i] if i >= 0 else "?"

    samples = []
    with open(sys.argv[2]) as f:
        for line in f:
            parts = line.split()
            try:
                user = parts[1] == "1"
                leaf = "<user>" if user else name(int(parts[0], 16))
                callers = [name(int(a, 16)) for a in parts[2].split(",")] if len(parts) > 2 else []
            except (IndexError, ValueError):
                # The last line of a shim that exited mid-write.
                continue
            samples.append((leaf, callers))
    total = len(samples)
    if total == 0:
        sys.exit("no samples")
    print(f"{total} samples")

    syscall = re.compile(r"^(__x64_sys_|__do_sys_|__se_sys_|ksys_|do_sys_)")
    causes = collections.Counter()
    for leaf, callers in samples:
        stack = [leaf] + callers
        named = [s for s in stack if syscall.match(s)]
        if leaf == "<user>":
            causes["user code"] += 1
        elif "halt" in leaf:
            causes["idle"] += 1
        elif "sysvec_apic_timer_interrupt" in stack:
            causes["timer interrupt (tick, hrtimers, softirqs)"] += 1
        elif "worker_thread" in stack or "kthread" in stack:
            causes["kernel threads"] += 1
        elif named:
            causes["syscall " + syscall.sub("", named[-1])] += 1
        elif "exc_page_fault" in stack:
            causes["page fault"] += 1
        else:
            causes["other kernel"] += 1
    print("\nby cause:")
    for cause, n in causes.most_common(25):
        print(f"{n:7d} {100 * n / total:5.1f}%  {cause}")

    print("\nleaf functions:")
    for leaf, n in collections.Counter(l for l, _ in samples).most_common(25):
        print(f"{n:7d} {100 * n / total:5.1f}%  {leaf}")

    if len(sys.argv) > 3:
        print("\non the stack:")
        for fn in sys.argv[3:]:
            n = sum(1 for leaf, callers in samples if fn == leaf or fn in callers)
            print(f"{n:7d} {100 * n / total:5.1f}%  {fn}")


if __name__ == "__main__":
    main()
