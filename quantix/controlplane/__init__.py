"""The node's link to the control plane: Connect-RPC JSON client, registration and heartbeat."""
