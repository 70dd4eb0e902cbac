"""Kubernetes: the cluster file from the nodes' labels, a plan as manifests, and the network fence.

No torch here: `continuo k8s ...` runs where kubectl runs. See inventory.py, render.py and fence.py.
"""
from .fence import Fence, Namespace, Pod, selects
from .inventory import (Inventory, Overlay, Problem, cluster_yaml, from_context, inventory, label_commands,
                        load_node_list, load_overlay, node_labels, node_list)
from .render import RenderOptions, Rendering, manifests_yaml, render, service_cluster, usable_nodes, write

__all__ = ["Fence", "Namespace", "Pod", "selects", "Inventory", "Overlay", "Problem", "cluster_yaml", "from_context",
           "inventory", "label_commands", "load_node_list", "load_overlay", "node_labels", "node_list",
           "RenderOptions", "Rendering", "manifests_yaml", "render", "service_cluster", "usable_nodes", "write"]
