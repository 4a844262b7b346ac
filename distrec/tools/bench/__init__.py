"""``distrec bench``: the scaling benchmark report (sweep -> results.json -> README.md + plots).

    distrec bench --quick --out report/
    distrec bench --out report/ --models demo,heavy --repeats 2
    distrec bench report report/results.json --out report/       # re-draw from stored results
    distrec bench compare old/results.json new/results.json

Modules: ``matrix`` (the runs), ``runner`` (each in its own processes), ``parse`` (their numbers),
``project`` (planner projection to 8/16/64 H100s), ``report`` (README.md and PNGs from results.json
only), ``compare`` (two reports side by side).
"""
