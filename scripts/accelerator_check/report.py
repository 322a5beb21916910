"""The report of ``scripts/check_accelerator.py``: ``report.json`` (the record of every part) and
``report.md`` (the same, readable), both replaced whole each time."""

from __future__ import annotations

import json
import os
import time
from typing import Any


def render_md(report: dict[str, Any]) -> str:
  """The report as markdown: a status line per part, then each part's results."""
  lines = [f"# fjt accelerator check ({report['started']})", "",
           f"`{report['command']}`: {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s "
           f"budget{', quick' if report['quick'] else ''}"
           f"{'' if report['finished'] else '; not finished (cut off, or still running)'}.", "",
           "| part | status | seconds | timeout (s) |", "|---|---|---:|---:|"]
  for name, part in report["parts"].items():
    lines.append(f"| {name} | {part['status']} | {part.get('seconds', '')} | "
                 f"{part.get('timeout_s', '')} |")
  for name, part in report["parts"].items():
    lines += ["", f"## {name}: {part['status']}"]
    if part.get("error"):
      lines += ["", f"Error: {part['error']} (see `{part.get('log')}`)"]
    if part.get("results"):
      lines += [""] + RENDERERS[name](part["results"])
  return "\n".join(lines) + "\n"


def _device_md(r: dict[str, Any]) -> list[str]:
  gib = 2.0**30
  lines = [f"- platform: {r['platform']}, {r['device_count']} x {r['device_kind']} "
           f"({r['process_count']} process), {r.get('platform_version')}",
           f"- host: {r['cpu_count']} CPUs, {r['host_memory']['available_bytes'] / gib:.1f} of "
           f"{r['host_memory']['total_bytes'] / gib:.1f} GiB available"]
  lines += [f"- device {m['device']}: {m['free_bytes'] / gib:.1f} of {m['limit_bytes'] / gib:.1f} "
            "GiB free" for m in r["device_memory"]]
  lines.append("- versions: " + ", ".join(f"{k} {v or 'not installed'}"
                                           for k, v in r["versions"].items()))
  if r.get("fjt_import_error"):
    lines.append(f"- **import fjt failed**: {r['fjt_import_error']}")
  return lines


def _tests_md(r: dict[str, Any]) -> list[str]:
  lines = [f"`{r['command']}`", ""]
  if "passed" in r:
    lines.append(f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, "
                 f"{r['skipped']} skipped")
    lines += [f"- FAILED `{t['id']}`: {t['reason']}" for t in r["failing"]]
  elif "so_far" in r:
    lines.append("cut off; so far: " + ", ".join(f"{v} {k}" for k, v in r["so_far"].items()))
  return lines


def _bench_md(r: dict[str, Any]) -> list[str]:
  quick = " (quick sizes: a smoke test, not numbers to report)" if r["quick"] else ""
  lines = [f"groups: {', '.join(r['groups'])}{quick}"
           f"{'; cut off in ' + r['timed_out_in'] if r.get('timed_out_in') else ''}", "",
           "| name | value | baseline | unit | ratio | target | met |",
           "|---|---:|---:|---|---:|---|---|"]
  for row in r["rows"]:
    met = {None: "", True: "yes", False: "**no**"}[row["met"]]
    lines.append(f"| {row['name']} | {row['value']:,.4g} | {row['baseline']:,.4g} | {row['unit']} "
                 f"| {row['ratio']:.2f} | {row['target'] or 'report'} | {met} |")
  return lines


def _determinism_md(r: dict[str, Any]) -> list[str]:
  if "bitwise_equal" not in r:
    return [f"cut off in {r.get('timed_out_in')}"]
  verdict = "bitwise equal" if r["bitwise_equal"] else (
      f"**not equal**: {len(r['differing'])} leaves differ (max |diff| {r['max_abs_diff']:.3g}): "
      + ", ".join(r["differing"][:5]))
  return [f"{r['config']}, {r['steps']} steps, seed {r['seed']}, deterministic=True, twice: "
          f"final params and batch statistics ({r['leaves']} leaves) {verdict}",
          f"- final eval: {r['eval'][0]} / {r['eval'][1]}"]


RENDERERS = {"device": _device_md, "tests": _tests_md, "bench": _bench_md,
             "determinism": _determinism_md}


def write_report(report: dict[str, Any], out: str, start: float) -> None:
  """``out/report.json`` and ``out/report.md``, each replaced whole (never half-written)."""
  report["elapsed_s"] = round(time.monotonic() - start, 1)
  for name, text in (("report.json", json.dumps(report, indent=1, default=str)),
                     ("report.md", render_md(report))):
    with open(os.path.join(out, name + ".tmp"), "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
