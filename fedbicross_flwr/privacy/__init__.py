"""Privacy audit of a run's outputs: membership inference (:mod:`.audit`), nearest training
images of the synthetic ones (:mod:`.nearest`), the personalized models (:mod:`.personalized`)
and the report (:mod:`.report`).
"""
