"""Build .dvc/plots/offline.html: dvc_render's page with vega, vega-lite and vega-embed inlined,
so that `dvc plots show` draws without a network (its own page loads them from a CDN).

    cd /tmp && npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2   # the versions dvc-render 1.0.2 loads
    python tools/make_offline_plots_html.py /tmp/vega-5.20.2.tgz /tmp/vega-lite-5.2.0.tgz /tmp/vega-embed-6.18.2.tgz

The page keeps dvc_render's placeholders {plot_divs} and {refresh_tag}, and leaves out {scripts}
(which would bring the CDN script tags back). All three libraries are BSD-3-Clause (Vega project).
"""

from __future__ import annotations

import hashlib
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / ".dvc" / "plots" / "offline.html"


def main(tarballs: list[str]) -> None:
    scripts, notes, licences = [], [], []
    for tgz in tarballs:
        with tarfile.open(tgz) as tar:
            pkg = __import__("json").load(tar.extractfile("package/package.json"))
            code = tar.extractfile("package/" + pkg["jsdelivr"]).read().decode()
            licence = tar.extractfile("package/LICENSE").read().decode().strip().replace("--", "- -")
        for bad in ("</script", "<!--", "{plot_divs}", "{scripts}", "{refresh_tag}"):
            assert bad not in code, f"{tgz} holds {bad!r}"
        sha = hashlib.sha256(code.encode()).hexdigest()
        notes.append(f"  {pkg['name']}@{pkg['version']} {pkg['jsdelivr']} ({pkg['license']}) sha256 {sha}")
        licences.append(f"{pkg['name']} licence:\n{licence}")
        scripts.append(f'<script type="text/javascript">/* {pkg["name"]}@{pkg["version"]} */\n{code}\n</script>')
    page = (
        "<!DOCTYPE html>\n<html>\n<head>\n    {refresh_tag}\n    <meta charset=\"utf-8\">\n"
        "    <title>DVC Plot</title>\n<!-- tlpipe: dvc plots show page that works offline. Inlined from npm, "
        "built by tools/make_offline_plots_html.py:\n" + "\n".join(notes) + "\n\n" + "\n\n".join(licences) + "\n-->\n"
        + "\n".join(scripts)
        + "\n    <style>\n        table {\n            border-spacing: 15px;\n        }\n    </style>\n"
        "</head>\n<body>\n    {plot_divs}\n</body>\n</html>\n")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(page, encoding="utf8")
    print(f"{OUT}: {len(page.encode()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
