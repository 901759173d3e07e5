"""A Snapshot as text: one section per concern, columns aligned, problems marked with `!`."""
from __future__ import annotations

from services.common.lsn import format_lsn
from services.status.collect import Snapshot


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(headers), line(["-" * width for width in widths])] + [line(row) for row in rows]


def _bytes(value: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def render(snapshot: Snapshot) -> str:
    out: list[str] = []
    current = (snapshot.current or {}).get("version", 0)
    canary = snapshot.canary or {}
    watermark = (snapshot.watermark or {}).get("lsn", 0)
    out.append(f"model/current v{current or '-'}"
               + (f"   model/canary v{canary.get('version')} share {float(canary.get('share', 0)):.0%}"
                  if canary.get("version") and canary.get("share") else "")
               + f"   data/watermark {format_lsn(int(watermark)) if watermark else '-'}")

    out += ["", "SERVICES"]
    rows = [[("" if h.status == "SERVING" else "! ") + h.service, h.address, h.status] for h in snapshot.health]
    out += _table(["service", "address", "health"], rows) if rows else ["(no service address given)"]

    out += ["", "RANKERS"]
    rows = []
    for r in snapshot.rankers:
        behind = current and r.model_version != current
        rows.append([("! " if behind or r.refused else "") + r.replica_id, r.address or "-", f"v{r.model_version}",
                     format_lsn(r.data_lsn) if r.data_lsn else "-", str(r.index_size), r.index_checksum[:12] or "-",
                     f"v{r.canary_version} {r.canary_share:.0%}" if r.canary_version else "-",
                     r.refused or "-", r.source])
    out += _table(["replica", "address", "model", "data_lsn", "index", "checksum", "canary", "refused", "from"],
                  rows) if rows else ["(no ranker registered in etcd)"]
    versions = {r.model_version for r in snapshot.rankers}
    if len(versions) > 1:
        out.append(f"! replicas disagree on the model version: {sorted(versions)}")

    out += ["", "CONSUMER GROUPS (delta stream)"]
    rows = [[("" if g.active else "! ") + g.name, format_lsn(g.confirmed_lsn) if g.confirmed_lsn else "-",
             _bytes(g.retained_wal_bytes), "streaming" if g.active else "NOT STREAMING", g.holder or "-",
             "done" if g.snapshot_done else "in progress"] for g in snapshot.groups]
    out += _table(["group", "confirmed", "lag (retained WAL)", "state", "holder", "snapshot"], rows) \
        if rows else ["(collector not asked or no group)"]

    if snapshot.features is not None:
        f = snapshot.features
        out += ["", f"FEATURES  applied {format_lsn(f['applied_lsn']) if f['applied_lsn'] else '-'}"
                    f"  lag {_bytes(f['lag_bytes'])} / {f['lag_seconds']:.1f} s"
                    f"  items {f['active_items']}  users {f['users']}"
                    f"  {'connected' if f['connected'] else '! NOT CONNECTED'}"
                    + ("" if f.get("text_model_state", "ready") == "ready"
                       else f"  ! text model {f['text_model_state'][:80]}")]

    if snapshot.trainer is not None:
        t = snapshot.trainer
        out += ["", f"TRAINER  leader {t['leader_id'] or '! none'}  current v{t['current_version']}"
                    f"  latest v{t['latest_version']}  pending {t['pending_interactions']} interactions"
                    f"{'  (training)' if t['busy'] else ''}"]
        rows = [[f"v{v.version}", f"v{v.parent}" if v.parent else "-", v.strategy, v.status,
                 f"{v.ndcg_at_10:.4f}", f"{v.baseline_ndcg_at_10:.4f}" if v.baseline_ndcg_at_10 else "-",
                 v.decision[:70]] for v in snapshot.versions]
        if rows:
            out += _table(["version", "parent", "strategy", "gate", "ndcg@10", "baseline", "decision"], rows)

    if snapshot.consistency is not None:
        c = snapshot.consistency
        out += ["", f"CONSISTENCY  last check {c['at']}: "
                    + ("consistent" if c["consistent"] else "! NOT CONSISTENT") + f"  {c['detail'][:90]}"]
        out += [f"! {p.get('check')} {p.get('subject')}: {str(p.get('detail'))[:100]}" for p in c["problems"][:10]]

    if snapshot.errors:
        out += [""] + [f"! {error}" for error in snapshot.errors]
    return "\n".join(out)
