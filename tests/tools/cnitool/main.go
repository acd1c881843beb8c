// Command cnitool is the test driver of ambient-cni: a cnitool-compatible front end over Debian's libcni
// (1.1.2), so tests run conflists exactly the way a container runtime does.
//
//	cnitool <add|check|del> <netname> <netns-path>
//
// Environment: NETCONFPATH (conf dir, default /etc/cni/net.d), CNI_PATH (plugin dirs, ':'-separated),
// CNI_IFNAME (default eth0), CNI_CONTAINERID (default derived from the netns path), CNI_ARGS ("K=V;K=V"),
// CAP_ARGS (JSON object -> capability args), CNI_CACHE_DIR (libcni cache dir).
//
// add prints the result JSON on stdout; check and del print nothing on success. On failure the error goes
// to stderr and, when it is a CNI error (*types.Error), its JSON {code,msg,details} to stdout; exit 1.
// del accepts an empty netns path (containerd's RemovePodSandbox case).
package main

import (
	"context"
	"crypto/sha512"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

const usage = "usage: cnitool <add|check|del> <netname> <netns-path>"

func envOr(name, fallback string) string {
	if v, ok := os.LookupEnv(name); ok && v != "" {
		return v
	}
	return fallback
}

// parseArgs splits "K=V;K=V" into pairs; an item without exactly one '=' is an error.
func parseArgs(raw string) ([][2]string, error) {
	var pairs [][2]string
	if raw == "" {
		return pairs, nil
	}
	for _, item := range strings.Split(raw, ";") {
		kv := strings.Split(item, "=")
		if len(kv) != 2 {
			return nil, fmt.Errorf("invalid CNI_ARGS pair %q", item)
		}
		pairs = append(pairs, [2]string{kv[0], kv[1]})
	}
	return pairs, nil
}

func containerID(netns string) string {
	if id := os.Getenv("CNI_CONTAINERID"); id != "" {
		return id
	}
	sum := sha512.Sum512([]byte(netns))
	return fmt.Sprintf("cnitool-%x", sum[:10])
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "cnitool:", err)
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		out, _ := json.Marshal(cniErr)
		fmt.Println(string(out))
	}
	os.Exit(1)
}

func run(command, netname, netns string) error {
	confDir := envOr("NETCONFPATH", "/etc/cni/net.d")
	list, err := libcni.LoadConfList(confDir, netname)
	if err != nil {
		return fmt.Errorf("loading conflist %q from %s: %w", netname, confDir, err)
	}
	var capArgs map[string]interface{}
	if raw := os.Getenv("CAP_ARGS"); raw != "" {
		if err := json.Unmarshal([]byte(raw), &capArgs); err != nil {
			return fmt.Errorf("CAP_ARGS is not a JSON object: %w", err)
		}
	}
	args, err := parseArgs(os.Getenv("CNI_ARGS"))
	if err != nil {
		return err
	}
	if netns != "" {
		if abs, err := filepath.Abs(netns); err == nil {
			netns = abs
		}
	}
	rt := &libcni.RuntimeConf{
		ContainerID:    containerID(netns),
		NetNS:          netns,
		IfName:         envOr("CNI_IFNAME", "eth0"),
		Args:           args,
		CapabilityArgs: capArgs,
	}
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), os.Getenv("CNI_CACHE_DIR"), nil)
	ctx := context.Background()
	switch command {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			return err
		}
		if result != nil {
			out, err := json.Marshal(result)
			if err != nil {
				return fmt.Errorf("encoding the result: %w", err)
			}
			fmt.Println(string(out))
		}
		return nil
	case "check":
		return cni.CheckNetworkList(ctx, list, rt)
	case "del":
		return cni.DelNetworkList(ctx, list, rt)
	}
	return fmt.Errorf("unknown command %q; %s", command, usage)
}

func main() {
	if len(os.Args) < 3 || len(os.Args) > 4 {
		fmt.Fprintln(os.Stderr, usage)
		os.Exit(2)
	}
	command, netname, netns := os.Args[1], os.Args[2], ""
	if len(os.Args) == 4 {
		netns = os.Args[3]
	}
	if netns == "" && command != "del" {
		fmt.Fprintln(os.Stderr, "cnitool: a netns path is required for", command)
		os.Exit(2)
	}
	if err := run(command, netname, netns); err != nil {
		fail(err)
	}
}
