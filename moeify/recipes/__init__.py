"""Upcycling recipes beyond E identical clones, each a step of the one verb `moeify(...)`:
fine-grained experts (`granularity`), experts from several checkpoints (`experts_from`), routers
initialised from data (`router_init`), Drop-Upcycling's partial re-initialisation
(`reinit_fraction`). Each module says which of the three laws it keeps and where it departs."""
