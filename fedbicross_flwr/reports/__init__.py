"""Reports of a run: the run folder and its summary (:mod:`.results`), the comparison of
methods (:mod:`.comparison`, :mod:`.summary_figure`) and the knowledge flow from teachers to
students (:mod:`.knowledge`).
"""
