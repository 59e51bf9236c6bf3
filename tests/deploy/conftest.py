from deploy_helpers import promtool, queries, yaml_mod

__all__ = ["promtool", "queries", "yaml_mod"]
