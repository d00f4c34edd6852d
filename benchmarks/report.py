"""The bench result: a plain JSON-able dict, rendered as markdown (and optionally a bar chart)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError
from ..measure import decode_tokens_per_s, prefill_ms, spread

DEFINITIONS = {
    "prefill_ms": "time to first token: from the generate call until the first new token exists (prompt forward pass + first pick)",
    "decode_tok_s": "batch x (new tokens - 1) / (generation time - time to first token), per run",
    "e2e_tok_s": "batch x new tokens / generation time (prefill included), per run",
    "roofline_tok_s": "batch x bandwidth / streamed weight bytes: every weight except embedding tables (read by Gather, "
    "one row per token) is read once per decode step; KV-cache reads are not counted",
    "roofline_fraction": "median over runs of (decode tok/s / roofline tok/s), each run against the bandwidth measured "
    "just before its round (bandwidth.per_round); roofline_tok_s is the median of those rooflines. Without per-round "
    "values: median decode tok/s / the roofline of the one measurement before the runs",
    "peak_rss_mib": "peak resident set size (Linux VmHWM; ru_maxrss elsewhere) of the system's own worker process after "
    "all its runs: Python, its imports, the loaded model and every run; builds (compile, export, model builder) ran "
    "in other processes and are not included",
    "baseline_rss_mib": "the same worker's peak RSS before it loaded the model (Python + luffy's imports, which every "
    "worker carries)",
    "build_s": "wall time of the build step: luffy.compile incl. its parity check, torch.onnx.export, or the genai "
    "model builder process; None when the bench was given a compiled artifact (then see build_source)",
    "stats": "median, min, max and quartiles over the timed runs; warm-up runs are discarded",
}


def batch_result(batch: int, new_tokens: int, runs: list[dict], streamed_bytes: int | None, bandwidth: float | None) -> dict:
    """Stats of one system at one batch size from its timed runs ({ttft_s, total_s})."""
    prefill = [prefill_ms(r) for r in runs]
    decode = [decode_tokens_per_s(batch, new_tokens, r) for r in runs]
    e2e = [batch * new_tokens / r["total_s"] for r in runs]
    out = {"batch": batch, "runs": runs, "prefill_ms": spread(prefill), "decode_tok_s": spread(decode),
           "e2e_tok_s": spread(e2e), "roofline_tok_s": None, "roofline_fraction": None}
    if not streamed_bytes:
        return out
    if runs and all(r.get("bandwidth_gb_s") for r in runs):  # each run against its own round's bandwidth
        roofs = [batch * r["bandwidth_gb_s"] * 1e9 / streamed_bytes for r in runs]
        out["roofline_tok_s"] = float(np.median(roofs))
        out["roofline_fraction"] = float(np.median([d / roof for d, roof in zip(decode, roofs)]))
    elif bandwidth:
        roof = batch * bandwidth * 1e9 / streamed_bytes
        out["roofline_tok_s"] = roof
        out["roofline_fraction"] = out["decode_tok_s"]["median"] / roof
    return out


def count(n: int | None) -> str:
    """156_000_000 -> '156M'; small counts in full."""
    if n is None:
        return "?"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def require_matplotlib() -> None:
    """Fail fast (before a long bench) when --plot cannot be honoured."""
    if importlib.util.find_spec("matplotlib") is None:
        raise BackendUnavailableError("--plot needs matplotlib: pip install 'luffy[bench]'")


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _spread(stats: dict) -> str:
    if stats["n"] == 1:
        return _fmt(stats["median"])
    return f"{_fmt(stats['median'])} [{_fmt(stats['min'])}–{_fmt(stats['max'])}]"


@dataclass
class BenchReport:
    """What `bench` returns. ``data`` is the JSON document; ``systems`` / ``system(name)`` read it."""

    data: dict

    @property
    def systems(self) -> list[dict]:
        return self.data["systems"]

    def system(self, name: str) -> dict:
        for entry in self.systems:
            if entry["name"] == name:
                return entry
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2) + "\n"

    def write_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    def write_markdown(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_markdown())
        return path

    def to_markdown(self) -> str:
        d = self.data
        s = d["settings"]
        m = d["machine"]
        v = m["versions"]
        runs = f"{s['repeats']} timed run{'s' if s['repeats'] != 1 else ''} per cell"
        runs += f" after {s['warmup']} warm-up run{'s' if s['warmup'] != 1 else ''}" if s["warmup"] else " (no warm-up)"
        lines = [f"Model: {d['model']['description']}. Prompt {s['prompt_len']} tokens, {s['gen_len']} new tokens "
                 f"(greedy, no early stop), {runs}, systems interleaved; cells are median [min–max].", ""]
        flags = f", {'/'.join(m['cpu_flags'])}" if m["cpu_flags"] else ""
        lines.append(f"Machine: {m['cpu']}{flags}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}; python "
                     f"{v['python']}, onnxruntime {v['onnxruntime']}, torch {v['torch']}, transformers {v['transformers']}, "
                     f"onnxruntime-genai {v['onnxruntime-genai']}, luffy {v['luffy']}.")
        bw = d.get("bandwidth")
        if bw:
            per = ", ".join(f"{t} thread{'s' if t != '1' else ''} {g:.1f}" for t, g in bw["by_threads"].items())
            line = (f"Streaming-read bandwidth: {bw['gb_per_s']:.1f} GB/s before the runs ({per} GB/s; numpy sum over "
                    f"{bw['buffer_mib']} MiB, best of {bw['passes']})")
            rounds = bw.get("per_round")
            if rounds:
                line += (f"; re-measured before each of the {rounds['n']} timed rounds (best of {rounds['passes']}): "
                         f"median {_fmt(rounds['median'])} [{_fmt(rounds['min'])}–{_fmt(rounds['max'])}] GB/s, and each "
                         "run's roofline uses its round's value")
            lines.append(line + ".")
        busy = d.get("cpu_account") or {}
        if busy.get("other_cpu_share") is not None:
            note = f"Other processes used {busy['other_cpu_share']:.0%} of the machine's CPU time during the run"
            lines.append(note + (" — numbers may be disturbed." if busy["other_cpu_share"] > 0.05 else "."))
        lines.append("")
        first = s["batches"][0]
        lines += [
            "| system | batch | prefill ms | decode tok/s | end-to-end tok/s | % of roofline | peak RSS MiB | compile s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for sys_ in self.systems:
            if sys_["status"] != "ok":
                continue
            r = next((r for r in sys_["results"] if r["batch"] == first), None)
            if r is None:
                continue
            roof = f"{r['roofline_fraction']:.0%} of {_fmt(r['roofline_tok_s'])}" if r["roofline_fraction"] else "—"
            build = _fmt(sys_.get("build_s"))
            if sys_.get("build_s") is not None and sys_.get("build_source") == "manifest":
                build += " (manifest)"
            lines.append(f"| {sys_['label']} | {first} | {_spread(r['prefill_ms'])} | {_spread(r['decode_tok_s'])} | "
                         f"{_fmt(r['e2e_tok_s']['median'])} | {roof} | {_fmt(sys_.get('peak_rss_mib'))} | {build} |")
        if len(s["batches"]) > 1:
            lines += ["", "Batch scaling, decode tok/s (all sequences together; % of that batch's roofline):", "",
                      "| system | " + " | ".join(f"batch {b}" for b in s["batches"]) + " |",
                      "|---|" + "---|" * len(s["batches"])]
            for sys_ in self.systems:
                if sys_["status"] != "ok":
                    continue
                cells = []
                for b in s["batches"]:
                    r = next((r for r in sys_["results"] if r["batch"] == b), None)
                    if r is None:
                        cells.append("—")
                        continue
                    frac = f" ({r['roofline_fraction']:.0%})" if r["roofline_fraction"] else ""
                    cells.append(_fmt(r["decode_tok_s"]["median"]) + frac)
                lines.append(f"| {sys_['label']} | " + " | ".join(cells) + " |")
        lines += self._speculation_lines()
        others = [x for x in self.systems if x["status"] != "ok"]
        baseline = max((x.get("baseline_rss_mib") or 0 for x in self.systems), default=0)
        noted = [x for x in self.systems if x["status"] == "ok" and x.get("note")]
        if others or noted:
            lines.append("")
            lines += [f"- {x['name']}: {x['status']} — {x['reason']}" for x in others]
            lines += [f"- {x['name']}: {x['note']}" for x in noted]
        lines += ["", "Prefill = time to first token. Decode tok/s = batch × (new tokens − 1) / (generation time − "
                  "time to first token), per run. Roofline = batch × bandwidth / bytes of weights streamed per decode "
                  "step (embedding tables excluded); % of roofline = median over runs of decode ÷ that run's roofline. "
                  "Peak RSS = peak resident memory (VmHWM) of the system's own worker "
                  f"process, builds excluded; every worker starts at ~{_fmt(baseline)} MiB (Python + luffy's imports)."]
        return "\n".join(lines) + "\n"

    def _speculation_lines(self) -> list[str]:
        """Acceptance and output identity of the speculative rows, against plain luffy at each batch."""
        plain = next((x for x in self.systems if x["name"] == "luffy" and x["status"] == "ok"), None)
        rows = [x for x in self.systems if x["status"] == "ok" and any("acceptance_rate" in r for r in x["results"])]
        if plain is None or not rows:
            return []
        lines = ["", "Speculative decoding against plain luffy (same artifact, greedy):", ""]
        for sys_ in rows:
            for r in sys_["results"]:
                base = next(p for p in plain["results"] if p["batch"] == r["batch"])
                speedup = r["decode_tok_s"]["median"] / base["decode_tok_s"]["median"]
                same = "identical" if r["tokens_agree_with_luffy"] == self.data["settings"]["gen_len"] else (
                    f"first {r['tokens_agree_with_luffy']} tokens identical")
                lines.append(f"- {sys_['label']}, batch {r['batch']}: decode {speedup:.2f}x, acceptance "
                             f"{r['acceptance_rate']:.2f}, {r['tokens_per_target_step']:.2f} tokens per target step, "
                             f"output {same}")
        return lines

    def plot(self, path) -> Path:
        """Bar chart of median decode tok/s per system and batch, with the first system's roofline (dashed) when it
        is in range; needs matplotlib."""
        require_matplotlib()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        systems = [x for x in self.systems if x["status"] == "ok"]
        batches = self.data["settings"]["batches"]
        width = 0.8 / max(1, len(systems))
        fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(batches) + 0.4 * len(systems), 4))
        for i, sys_ in enumerate(systems):
            xs, ys = [], []
            for j, b in enumerate(batches):
                r = next((r for r in sys_["results"] if r["batch"] == b), None)
                if r is not None:
                    xs.append(j + i * width)
                    ys.append(r["decode_tok_s"]["median"])
            ax.bar(xs, ys, width, label=sys_["label"])
        roofs = [next((r["roofline_tok_s"] for r in systems[0]["results"] if r["batch"] == b), None) if systems else None
                 for b in batches]
        tallest = max((r["decode_tok_s"]["median"] for x in systems for r in x["results"]), default=0)
        for j, roof in enumerate(roofs):
            if roof and roof < 2 * tallest:  # a roofline far above every bar would only flatten them
                ax.hlines(roof, j - width / 2, j + 0.8 - width / 2, colors="black", linestyles="dashed",
                          label=f"{systems[0]['label']} roofline" if j == 0 else None)
        ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_ylabel("decode tokens/s (median)")
        ax.set_title(self.data["model"]["description"], fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
