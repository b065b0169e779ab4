"""The digits evidence's outputs: markdown tables and curves, written together with the JSON,
each naming the sha256 of the JSON it came from."""
import hashlib
import json
import os

import numpy as np

from demo import flag_value


def label(result, arm):
    return result["settings"]["arm_definitions"][arm]["label"]


def fmt(name, value, signed=False):
    """A metric value as the tables print it: FD and KID as numbers, the rest in percent."""
    sign = "+" if signed else ""
    if name in ("frechet_distance", "kid"):
        return f"{value:{sign}.2f}"
    return f"{100 * value:{sign}.1f}%"


def fmt_ms(name, ms):
    return f"{fmt(name, ms[0])} ± {fmt(name, ms[1]).rstrip('%')}"


def metric_label(name):
    if name.startswith("probe_t"):
        t, block = name[len("probe_t"):].split("_b")
        return f"linear probe top-1, t = {t}, block {block}"
    return {"frechet_distance": "Frechet distance", "kid": "KID x 1000", "precision": "precision",
            "recall": "recall", "class_consistency": "class consistency"}[name]


def fmt_paired(name, paired):
    """'mean [lo, hi], LSEP better on k of n (sign test p)'."""
    n = len(paired["diffs"])
    interval = "" if paired["interval"] is None else \
        f" [{fmt(name, paired['interval'][0], True)}, {fmt(name, paired['interval'][1], True)}]"
    return (f"{fmt(name, paired['mean'], True)}{interval} | {paired['treated_better']}/{n} "
            f"(p = {paired['sign_test_p']:.2f})")


def markdown(result, sha):
    """The design, the endpoints, steps to thresholds, the probe, equal FLOPs, then every curve."""
    cfg, s = result["settings"], result["summary"]
    arms, treated, control = cfg["arms"], cfg["treated"], cfg["control"]
    n, floor = len(s["seeds"]), result["judge"]["real_floor"]
    vs = f"{label(result, treated)} - {label(result, control)}"
    lines = [
        f"Arms: {', '.join(label(result, a) for a in arms)}; {cfg['steps']} steps each, batch "
        f"{flag_value(cfg['train_flags'], '--batch-size')}, paired seeds "
        f"{', '.join(map(str, s['seeds']))} (same initial weights, data order and sample noise per seed). "
        f"{cfg['samples']} samples per measurement ({cfg['sample_steps']}-step Heun ODE, balanced labels) vs "
        f"{result['data']['held_out']} held-out real digits; judge CNN held-out accuracy "
        f"{100 * result['judge']['held_out_accuracy']:.1f}%. The floor, {cfg['samples']} real training digits vs "
        f"the held-out ones: Frechet distance {floor['frechet_distance']:.2f}, KID x 1000 {floor['kid']:.2f}, "
        f"class consistency {100 * floor['class_consistency']:.1f}%.", "",
        f"**Endpoints** (fixed before the run): paired per-seed differences {vs}, mean "
        f"[{100 * s['endpoints'][0]['paired']['confidence']:.0f}% t interval over {n} seeds]; "
        f"\"better\": seeds on which {label(result, treated)} is better, with the exact sign-test p.", "",
        "| step | CFG | metric | " + " | ".join(label(result, a) for a in arms) + " | difference [interval] | better |",
        "| --- | --- | --- |" + " --- |" * len(arms) + " --- | --- |"]
    for e in s["endpoints"]:
        lines.append(f"| {e['step']} | {e['cfg']} | {metric_label(e['metric'])} | "
                     + " | ".join(fmt_ms(e["metric"], e[f"{a}_mean_std"]) for a in arms)
                     + f" | {fmt_paired(e['metric'], e['paired'])} |")
    lines += ["", f"**Steps to a threshold** (CFG 1.0, linear between checkpoints; '-': not reached by step "
              f"{cfg['steps']}). Paired difference {vs} over the seeds where both reach it:", "",
              "| threshold | " + " | ".join(f"{label(result, a)} (per seed)" for a in arms) + " | difference | better |",
              "| --- |" + " --- |" * len(arms) + " --- | --- |"]
    for t in s["thresholds"]:
        ops = "<=" if t["metric"] in ("frechet_distance", "kid") else ">="
        per_arm = [", ".join("-" if v is None else f"{v:.0f}" for v in t["steps"][a]) for a in arms]
        if t["paired"] is None:
            diff = "no seed reached it in both arms | -"
        else:
            p = t["paired"]
            interval = "" if p["interval"] is None else f" [{p['interval'][0]:+.0f}, {p['interval'][1]:+.0f}]"
            diff = (f"{p['mean']:+.0f} steps{interval} | {p['treated_better']}/{len(p['diffs'])} "
                    f"(p = {p['sign_test_p']:.2f})")
        lines.append(f"| {metric_label(t['metric'])} {ops} {fmt(t['metric'], t['threshold'])} | "
                     + " | ".join(per_arm) + f" | {diff} |")
    lines += ["", f"**Held-out linear probe** at step {cfg['steps']} (EMA weights, null label):", "",
              "| probe | " + " | ".join(label(result, a) for a in arms) + " | difference [interval] | better |",
              "| --- |" + " --- |" * len(arms) + " --- | --- |"]
    for p in s["probe"]:
        lines.append(f"| {metric_label(p['name'])} | " + " | ".join(fmt_ms(p["name"], p[f"{a}_mean_std"]) for a in arms)
                     + f" | {fmt_paired(p['name'], p['paired'])} |")
    eq = s["equal_flops"]
    lines += ["", f"**Equal training FLOPs** ({eq['flops'] / 1e9:.0f} GFLOPs, the cheapest arm's {cfg['steps']} steps: "
              + ", ".join(f"{label(result, a)} at {eq['steps'][a]:.0f} steps" for a in arms)
              + "; CFG 1.0, linear in FLOPs between checkpoints):", "",
              "| metric | " + " | ".join(label(result, a) for a in arms) + " | difference [interval] | better |",
              "| --- |" + " --- |" * len(arms) + " --- | --- |"]
    for m in eq["metrics"]:
        lines.append(f"| {metric_label(m['metric'])} | " + " | ".join(fmt_ms(m["metric"], m[f"{a}_mean_std"]) for a in arms)
                     + f" | {fmt_paired(m['metric'], m['paired'])} |")
    depth = flag_value(cfg["train_flags"], "--encoder-depth")
    names = ["frechet_distance", "kid", "precision", "recall", "class_consistency", f"probe_t0.5_b{depth}"]
    lines += ["", f"**Curves** (CFG 1.0, mean ± std over seeds; probe at block {depth}, the LSEP probe depth):", "",
              "| arm | step | GFLOPs | " + " | ".join(metric_label(c) for c in names) + " |",
              "| --- | --- | --- |" + " --- |" * len(names)]
    for a in arms:
        for row in s["curves"][a]:
            lines.append(f"| {label(result, a)} | {row['step']} | {row['flops'] / 1e9:.0f} | "
                         + " | ".join(fmt_ms(c, row[c]) for c in names) + " |")
    lines += ["", "Training wall-clock (`train.py`'s timer, "
              f"{cfg['jobs']} runs at a time, one thread each): "
              + ", ".join(f"{label(result, a)} {result['ms_per_step'][a]:.0f} ms/step" for a in arms
                          if result["ms_per_step"][a] is not None)
              + "; FLOPs per step (models/flops.py): "
              + ", ".join(f"{label(result, a)} {result['flops_per_step'][a] / 1e9:.2f} G" for a in arms) + ".",
              "", f"<sub>from digits_evidence.json, sha256 {sha}</sub>", ""]
    return "\n".join(lines)


def plot(result, path, sha):
    """Metric vs steps (mean over seeds, thin lines: each seed) and vs FLOPs, CFG 1.0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["settings"]
    depth = flag_value(cfg["train_flags"], "--encoder-depth")
    names = ["frechet_distance", "kid", "class_consistency", f"probe_t0.5_b{depth}"]
    fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 6.4))
    for k, name in enumerate(names):
        for row, axis in enumerate(("step", "flops")):
            ax = axes[row, k]
            for arm in cfg["arms"]:
                curve = result["summary"]["curves"][arm]
                x = np.array([c[axis] for c in curve], dtype=np.float64) / (1 if axis == "step" else 1e9)
                scale = 1 if name in ("frechet_distance", "kid") else 100
                mean = np.array([c[name][0] for c in curve]) * scale
                std = np.array([c[name][1] for c in curve]) * scale
                line, = ax.plot(x, mean, marker="o", markersize=3, label=label(result, arm))
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            ax.set_xlabel("training steps" if axis == "step" else "training GFLOPs")
            ax.set_ylabel(metric_label(name) + ("" if name in ("frechet_distance", "kid") else " (%)"), fontsize=8)
            ax.grid(alpha=0.3)
            if k == 0 and row == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"MNIST 16 px, {len(result['summary']['seeds'])} paired seeds, CFG 1.0: mean ± std over seeds "
                 f"(digits_evidence.json sha256 {sha})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Description": f"digits_evidence.json sha256 {sha}"})
    plt.close(fig)


def write_results(result, results_dir):
    """JSON, markdown and PNG, each written to a temporary file, then renamed into place JSON last;
    the markdown and PNG name the sha256 of the JSON bytes, so a mismatched set is detectable."""
    os.makedirs(results_dir, exist_ok=True)
    text = json.dumps(result, indent=1).encode()
    sha = hashlib.sha256(text).hexdigest()[:16]
    paths = {ext: os.path.join(results_dir, f"digits_evidence.{ext}") for ext in ("json", "md", "png")}
    tmp = {ext: f"{path}.tmp-{os.getpid()}.{ext}" for ext, path in paths.items()}
    try:
        with open(tmp["json"], "wb") as f:
            f.write(text)
        with open(tmp["md"], "w") as f:
            f.write(markdown(result, sha))
        plot(result, tmp["png"], sha)
        for ext in ("png", "md", "json"):
            os.replace(tmp[ext], paths[ext])
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    return paths, sha
