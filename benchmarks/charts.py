"""The chart of scenarios 1-6 (benchmarks/out/results.png), with matplotlib."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench import BACKUP_CONTENDERS


def chart(results: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: no chart (pip install -e '.[bench]')"
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    names = [
        n
        for n in BACKUP_CONTENDERS
        if any(
            n in results.get(k, {}).get("contenders", {}) for k in ("s1", "s2", "s3")
        )
    ]
    keys = [k for k in ("s1", "s2", "s3") if k in results]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for j, k in enumerate(keys):
            c = results[k]["contenders"].get(name)
            raw = results[k]["contenders"].get("raw_c")
            if not c or not raw:
                continue
            ratios = [
                x / y
                for x, y in zip(
                    c["elapsed"]["runs"], raw["elapsed"]["runs"], strict=False
                )
            ]
            q1, _, q3 = (
                statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            )
            xs.append(j + i * width)
            ys.append(statistics.median(ratios))
            lo.append(max(0.0, ys[-1] - q1))
            hi.append(max(0.0, q3 - ys[-1]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=name)
    ax.axhline(1.05, color="red", linestyle="--", linewidth=1, label="target 1.05")
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))])
    ax.set_xticklabels(
        [
            f"{k[1]}: step({results[k]['pages_per_step']})"
            f"\n-> {results[k]['dest'].rsplit('/', 1)[-1]}"
            for k in keys
        ]
    )
    ax.set_ylabel("time / raw C in the same round\n(median, quartiles)")
    ax.set_title("Scenarios 1-3: backup time relative to raw C")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    s4 = results.get("s4")
    if s4:
        labels, p50, p99 = [], [], []
        for mode, m in s4["modes"].items():
            for config in s4["configs"]:
                if config in m:
                    labels.append(f"{mode}\n{config.replace('+', chr(10) + '+')}")
                    p50.append(m[config]["p50_ms"])
                    p99.append(m[config]["p99_ms"])
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], p50, 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], p99, 0.4, label="p99")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_ylabel("commit latency, ms")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_title("Scenario 4: writer commit latency during step(100)")

    ax = axes[1][0]
    s5 = results.get("s5")
    if s5:
        labels, values = [], []
        for size in s5["sizes"].values():
            for key, c in size["contenders"].items():
                labels.append(f"{key}\n{size['source']['bytes'] / 1e6:.0f} MB")
                values.append(c["maxrss_kb"] / 1024)
        ax.bar(range(len(labels)), values)
        ax.axhline(100, color="red", linestyle="--", linewidth=1, label="target 100 MB")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel("peak RSS, MB")
        ax.legend(fontsize=8)
    ax.set_title("Scenario 5: peak RSS of a file->file backup")

    ax = axes[1][1]
    s6 = results.get("s6")
    if s6:
        labels, values, colors = [], [], []
        for mode, m in s6["modes"].items():
            for contender in ("apsw_backup", "stdlib"):
                r = m.get(contender)
                if not r:
                    continue
                labels.append(f"{mode}\n{contender}")
                finished = r["elapsed"] is not None
                values.append(r["elapsed"]["median"] if finished else s6["cap_seconds"])
                colors.append("tab:blue" if finished else "tab:gray")
        ax.bar(range(len(labels)), values, color=colors)
        for x, (v, c) in enumerate(zip(values, colors, strict=True)):
            if c == "tab:gray":
                ax.text(x, v, "did not\nfinish", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylim(0, s6["cap_seconds"] * 1.25)
        ax.set_ylabel("seconds to finish (median)")
    ax.set_title("Scenario 6: copy under constant writes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
