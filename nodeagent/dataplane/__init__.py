"""In-pod redirection: iptables rules and policy routes inside the pod netns, and ZDS to ztunnel."""
