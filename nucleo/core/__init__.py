"""The ground floor: what every family and every layer above imports.

``registry`` (named components, entry-point plugins), ``schema`` (typed configs from YAML and
overrides), ``types`` (Batch, ModelOutput, LossOutput), ``protocols`` (the seams' interfaces),
``alphabet`` (DNA letters and ids), ``representations`` (CGR, DNA walk, persistence),
``device`` and ``runtime`` (where and how a process computes), ``progress`` and ``machine``
(what users and reports see). Nothing here imports another part of the project.
"""
