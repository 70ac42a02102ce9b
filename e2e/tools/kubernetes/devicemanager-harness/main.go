// Command devicemanager-harness runs the kubelet's own device manager
// (k8s.io/kubernetes/pkg/kubelet/cm/devicemanager, the code a real kubelet
// runs) with rm-device-plugin registering to it, and checks what the kubelet
// would see: capacity and allocatable per resource, an allocation through
// the manager (GetPreferredAllocation + Allocate over the real gRPC), health
// changes, the node agent's socket resource for CPU containers, and
// re-registration after the manager restarts.
//
// The device manager listens on the kubelet's fixed socket
// (/var/lib/kubelet/device-plugins/kubelet.sock, as in the kubelet), so this
// needs root and a machine without a running kubelet. The host is a TEST
// DOUBLE sysfs/dev tree (two NVIDIA GPUs on NUMA nodes 0 and 1, one RNGD).
//
//	go run ./devicemanager-harness -plugin target/debug/rm-device-plugin
//
// With -report, it instead lays out -gpus/-atoms/-rngds fake devices, waits
// until the device manager holds all of them, and prints what a kubelet would
// put in its node's status: one RESOURCE=COUNT per resource (allocatable).
// The demo gives its kwok nodes these numbers. With -layout DIR, it only
// writes that tree under DIR (the real node's test double; no device manager).
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	cadvisorapi "github.com/google/cadvisor/lib/model"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/klog/v2"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	"k8s.io/kubernetes/pkg/kubelet/cm/containermap"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
	kubecontainer "k8s.io/kubernetes/pkg/kubelet/container"
	"k8s.io/kubernetes/pkg/kubelet/lifecycle"
)

const (
	gpu  = "nvidia.com/gpu"
	rngd = "furiosa.ai/rngd"
	atom = "rebellions.ai/ATOM"
	gpu0 = "GPU-00000000-0000-0000-0000-00000000aaaa"
	gpu1 = "GPU-00000000-0000-0000-0000-00000000bbbb"
	// The node agent's socket as a resource, and the host directory its
	// Allocate mounts (the agent need not run for this).
	agent    = "rm-abstract.io/agent"
	agentDir = "/var/run/rm-abstract"
)

type sourcesReady struct{}

func (sourcesReady) AddSource(string) {}
func (sourcesReady) AllReady() bool   { return true }

// stopPluginOnFail stops the plugin process when fail exits (os.Exit skips
// deferred calls).
var stopPluginOnFail = func() {}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "FAIL: "+format+"\n", args...)
	stopPluginOnFail()
	os.Exit(1)
}

func write(root, rel, content string) {
	p := filepath.Join(root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		fail("%v", err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		fail("%v", err)
	}
}

func pci(root, addr, vendor, device, class string, numa int) {
	d := "sys/bus/pci/devices/" + addr
	write(root, d+"/vendor", vendor+"\n")
	write(root, d+"/device", device+"\n")
	write(root, d+"/class", class+"\n")
	write(root, d+"/numa_node", fmt.Sprintf("%d\n", numa))
}

// nvidiaGPU lays out what the NVIDIA driver exposes for one GPU.
func nvidiaGPU(root, addr string, minor int, uuid string, numa int) {
	pci(root, addr, "0x10de", "0x2330", "0x030200", numa)
	write(root, "proc/driver/nvidia/gpus/"+addr+"/information", fmt.Sprintf(
		"Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 150\nGPU UUID: \t %s\nVideo BIOS: \t 96.00.99.00.01\n"+
			"Bus Type: \t PCIe\nDMA Size: \t 52 bits\nDMA Mask: \t 0xfffffffffffff\nBus Location: \t %s\n"+
			"Device Minor: \t %d\nGPU Excluded:\t No\n", uuid, addr, minor))
	write(root, fmt.Sprintf("dev/nvidia%d", minor), "")
	write(root, "dev/nvidiactl", "")
	write(root, "dev/nvidia-uvm", "")
	write(root, "dev/nvidia-uvm-tools", "")
}

// rblnATOM lays out what the Rebellions driver exposes for one ATOM
// (RBLN-CA22) bound as rbln<index>.
func rblnATOM(root, addr string, index int, numa int) {
	pci(root, addr, "0x1eff", "0x1220", "0x120000", numa)
	class := filepath.Join(root, fmt.Sprintf("sys/class/rebellions/rbln%d", index))
	if err := os.MkdirAll(class, 0o755); err != nil {
		fail("%v", err)
	}
	if err := os.Symlink("../../../bus/pci/devices/"+addr, filepath.Join(class, "device")); err != nil {
		fail("%v", err)
	}
	write(root, fmt.Sprintf("dev/rbln%d", index), "")
	write(root, "dev/rsd0", "")
}

// furiosaRNGD lays out what the FuriosaAI driver exposes for one RNGD.
func furiosaRNGD(root, addr string, index int, uuid string, numa int) {
	pci(root, addr, "0x1ed2", "0x0001", "0x120000", numa)
	for pe := 0; pe < 8; pe++ {
		write(root, fmt.Sprintf("dev/rngd/npu%dpe%d", index, pe), "")
		write(root, fmt.Sprintf("dev/rngd/npu%dch%d", index, pe), "")
	}
	write(root, fmt.Sprintf("dev/rngd/npu%dmgmt", index), "")
	m := fmt.Sprintf("sys/class/rngd_mgmt/rngd!npu%dmgmt", index)
	write(root, m+"/busname", addr+"\n")
	write(root, m+"/device_uuid", uuid+"\n")
	write(root, m+"/device_state", "0\n")
	write(root, m+"/heartbeat", "1\n")
	write(root, m+"/platform_type", "FuriosaAI\n")
}

// allocate admits a pod whose one container asks for one of `res` and
// allocates it through the manager (which asks our plugin for a preferred
// allocation, then calls Allocate); returns the pod and the container's run
// options.
func allocate(m *devicemanager.ManagerImpl, pods *[]*v1.Pod, name, uid, res string) (*v1.Pod, *devicemanager.DeviceRunContainerOptions) {
	one := v1.ResourceList{v1.ResourceName(res): resource.MustParse("1")}
	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID(uid)},
		Spec: v1.PodSpec{Containers: []v1.Container{{
			Name:      "app",
			Resources: v1.ResourceRequirements{Limits: one, Requests: one},
		}}},
	}
	*pods = append(*pods, pod)
	ctx := context.Background()
	if err := m.Allocate(ctx, pod, &pod.Spec.Containers[0], lifecycle.AddOperation); err != nil {
		fail("Allocate %s for pod %s through the device manager: %v", res, name, err)
	}
	opts, err := m.GetDeviceRunContainerOptions(ctx, pod, &pod.Spec.Containers[0])
	if err != nil || opts == nil {
		fail("GetDeviceRunContainerOptions for pod %s: %v", name, err)
	}
	return pod, opts
}

// envOf is a container's environment as a map.
func envOf(opts *devicemanager.DeviceRunContainerOptions) map[string]string {
	env := map[string]string{}
	for _, e := range opts.Envs {
		env[e.Name] = e.Value
	}
	return env
}

// tokenRecord reads the record the device plugin wrote for token (named by
// its SHA-256, as the node agent finds it) into rec; it returns the raw JSON.
func tokenRecord(state, token, what string, rec any) ([]byte, error) {
	sum := sha256.Sum256([]byte(token))
	raw, err := os.ReadFile(filepath.Join(state, "tokens", hex.EncodeToString(sum[:])+".json"))
	if err != nil {
		fail("token record for %s: %v", what, err)
	}
	return raw, json.Unmarshal(raw, rec)
}

// mountsAgentDir reports whether the agent's socket directory is among the
// container's mounts, read-only, at the same path.
func mountsAgentDir(mounts []kubecontainer.Mount) bool {
	for _, m := range mounts {
		if m.HostPath == agentDir && m.ContainerPath == agentDir && m.ReadOnly {
			return true
		}
	}
	return false
}

func qty(l v1.ResourceList, name string) int64 {
	q, ok := l[v1.ResourceName(name)]
	if !ok {
		return -1
	}
	return q.Value()
}

// waitCapacity polls the manager until capacity and allocatable of `name`
// are as wanted.
func waitCapacity(logger klog.Logger, m *devicemanager.ManagerImpl, name string, capacity, allocatable int64, within time.Duration) time.Duration {
	start := time.Now()
	var c, a v1.ResourceList
	for time.Since(start) < within {
		c, a, _ = m.GetCapacity(logger)
		if qty(c, name) == capacity && qty(a, name) == allocatable {
			return time.Since(start)
		}
		time.Sleep(20 * time.Millisecond)
	}
	fail("%s: want capacity %d allocatable %d within %v; the device manager reports capacity %d allocatable %d",
		name, capacity, allocatable, within, qty(c, name), qty(a, name))
	return 0
}

func startManager(logger klog.Logger, pods *[]*v1.Pod) *devicemanager.ManagerImpl {
	topology := []cadvisorapi.Node{{Id: 0}, {Id: 1}}
	m, err := devicemanager.NewManagerImpl(logger, topology, topologymanager.NewFakeManager(logger))
	if err != nil {
		fail("device manager: %v", err)
	}
	active := func() []*v1.Pod { return *pods }
	if err := m.Start(logger, active, sourcesReady{}, containermap.NewContainerMap(), sets.New[string]()); err != nil {
		fail("device manager start: %v", err)
	}
	return m
}

// startPlugin runs rm-device-plugin on the fake host; stop it with the
// returned function.
func startPlugin(bin, host, state, work, logLevel string) func() {
	plugin := exec.Command(bin,
		"--host-root", host,
		"--kubelet-dir", pluginapi.DevicePluginPath,
		"--state-dir", state)
	plugin.Env = append(os.Environ(),
		"RM_DP_HEALTH_INTERVAL_MS=200",
		"RM_DP_AGENT_SOCKET_DIR="+agentDir,
		"RM_DP_AGENT_SLOTS=100",
		"RM_DP_POD_RESOURCES_SOCKET="+filepath.Join(work, "no-pod-resources.sock"),
		"RM_LOG="+logLevel)
	plugin.Stdout, plugin.Stderr = os.Stderr, os.Stderr
	if err := plugin.Start(); err != nil {
		fail("start %s: %v", bin, err)
	}
	stop := func() {
		_ = plugin.Process.Signal(os.Interrupt)
		_, _ = plugin.Process.Wait()
	}
	stopPluginOnFail = stop
	return stop
}

// layout writes the TEST DOUBLE sysfs/dev tree of gpus, atoms and rngds
// devices under host.
func layout(host string, gpus, atoms, rngds int) {
	for i := 0; i < gpus; i++ {
		nvidiaGPU(host, fmt.Sprintf("0000:%02x:00.0", 0x10+i), i, fmt.Sprintf("GPU-00000000-0000-0000-0000-%012d", i), i*2/max(gpus, 1))
	}
	for i := 0; i < atoms; i++ {
		rblnATOM(host, fmt.Sprintf("0000:%02x:00.0", 0x40+i), i, i*2/max(atoms, 1))
	}
	for i := 0; i < rngds; i++ {
		furiosaRNGD(host, fmt.Sprintf("0000:%02x:00.0", 0x70+i), i, fmt.Sprintf("RNGD-UUID-%04d", i), i*2/max(rngds, 1))
	}
}

// report prints the allocatable resources the device manager holds once the
// plugin registered the fake devices asked for.
func report(logger klog.Logger, pluginBin, work string, gpus, atoms, rngds int) {
	host := filepath.Join(work, "host")
	layout(host, gpus, atoms, rngds)
	var pods []*v1.Pod
	m := startManager(logger, &pods)
	defer m.Stop(logger)
	stop := startPlugin(pluginBin, host, filepath.Join(work, "state"), work, "error")
	defer stop()
	want := map[string]int64{agent: 100}
	if gpus > 0 {
		want[gpu] = int64(gpus)
	}
	if atoms > 0 {
		want[atom] = int64(atoms)
	}
	if rngds > 0 {
		want[rngd] = int64(rngds)
	}
	names := make([]string, 0, len(want))
	for name, n := range want {
		waitCapacity(logger, m, name, n, n, 10*time.Second)
		names = append(names, name)
	}
	sort.Strings(names)
	_, allocatable, _ := m.GetCapacity(logger)
	for _, name := range names {
		fmt.Printf("%s=%d\n", name, qty(allocatable, name))
	}
}

func main() {
	pluginBin := flag.String("plugin", "target/debug/rm-device-plugin", "rm-device-plugin binary")
	reportMode := flag.Bool("report", false, "print the node's allocatable resources for -gpus/-atoms/-rngds fake devices and exit")
	gpus := flag.Int("gpus", 0, "fake NVIDIA GPUs (with -report)")
	atoms := flag.Int("atoms", 0, "fake Rebellions ATOMs (with -report)")
	rngds := flag.Int("rngds", 0, "fake FuriosaAI RNGDs (with -report)")
	layoutDir := flag.String("layout", "", "only write the fake sysfs/dev tree of -gpus/-atoms/-rngds under this directory and exit (a real node's test double)")
	flag.Parse()
	logger := klog.Background()
	if *layoutDir != "" {
		layout(*layoutDir, *gpus, *atoms, *rngds)
		return
	}

	work, err := os.MkdirTemp("", "rm-devicemanager-harness-")
	if err != nil {
		fail("%v", err)
	}
	defer os.RemoveAll(work)

	// A checkpoint of an earlier run would hand its allocations to this one.
	checkpoint := filepath.Join(pluginapi.DevicePluginPath, "kubelet_internal_checkpoint")
	_ = os.Remove(checkpoint)
	defer os.Remove(checkpoint)

	if *reportMode {
		report(logger, *pluginBin, work, *gpus, *atoms, *rngds)
		return
	}
	host := filepath.Join(work, "host")
	nvidiaGPU(host, "0000:3b:00.0", 0, gpu0, 0)
	nvidiaGPU(host, "0000:af:00.0", 1, gpu1, 1)
	furiosaRNGD(host, "0000:5e:00.0", 0, "RNGD-UUID-0001", 0)
	state := filepath.Join(work, "state")

	var pods []*v1.Pod
	m := startManager(logger, &pods)
	stop := startPlugin(*pluginBin, host, state, work, "warn")
	defer stop()

	took := waitCapacity(logger, m, gpu, 2, 2, 10*time.Second)
	waitCapacity(logger, m, rngd, 1, 1, 2*time.Second)
	waitCapacity(logger, m, agent, 100, 100, 2*time.Second)
	fmt.Printf("ok  registered: %s capacity 2, %s capacity 1, %s capacity 100 (%v after the plugin started)\n", gpu, rngd, agent, took.Round(time.Millisecond))

	// One pod asking for one GPU, allocated through the manager: it asks
	// our plugin for a preferred allocation, then calls Allocate.
	pod, opts := allocate(m, &pods, "infer", "pod-uid-1", gpu)
	env := envOf(opts)
	visible := env["NVIDIA_VISIBLE_DEVICES"]
	if visible != gpu0 && visible != gpu1 {
		fail("NVIDIA_VISIBLE_DEVICES = %q, want one of the two GPU UUIDs (env %v)", visible, env)
	}
	var nodes []string
	for _, d := range opts.Devices {
		nodes = append(nodes, d.PathOnHost)
	}
	want := "/dev/nvidia0"
	if visible == gpu1 {
		want = "/dev/nvidia1"
	}
	joined := strings.Join(nodes, ",")
	if !strings.Contains(joined, want) || !strings.Contains(joined, "/dev/nvidiactl") {
		fail("device nodes %v: want %s and /dev/nvidiactl", nodes, want)
	}
	token := env["RM_AGENT_TOKEN"]
	if token == "" {
		fail("no RM_AGENT_TOKEN in the container's env %v", env)
	}
	var rec struct {
		ResourceName string   `json:"resourceName"`
		DeviceIDs    []string `json:"deviceIds"`
	}
	raw, err := tokenRecord(state, token, "the allocation", &rec)
	if err != nil || rec.ResourceName != gpu || len(rec.DeviceIDs) != 1 || rec.DeviceIDs[0] != visible {
		fail("token record %s does not grant %s of %s (%v)", raw, visible, gpu, err)
	}
	devs := m.GetDevices(string(pod.UID), "app")
	if _, ok := devs[gpu][visible]; !ok {
		fail("the device manager does not record %s for the pod: %v", visible, devs)
	}
	if !mountsAgentDir(opts.Mounts) {
		fail("the GPU container does not get the agent socket directory %s: %v", agentDir, opts.Mounts)
	}
	fmt.Printf("ok  allocated through the device manager: %s, nodes %v, token record written, agent socket dir mounted\n", visible, nodes)

	// A CPU container reaches the agent through the agent resource: the
	// socket directory is mounted (no hostPath volume in the pod spec) and
	// the slot's token is its identity at the agent; no devices.
	_, cpuOpts := allocate(m, &pods, "infer-cpu", "pod-uid-2", agent)
	cpuEnv := envOf(cpuOpts)
	slot := cpuEnv["RM_AGENT_SLOT_TOKEN"]
	if !mountsAgentDir(cpuOpts.Mounts) || len(cpuOpts.Devices) != 0 || len(cpuEnv) != 1 || slot == "" {
		fail("CPU container: want the read-only mount of %s and RM_AGENT_SLOT_TOKEN only, got mounts %v devices %v envs %v",
			agentDir, cpuOpts.Mounts, cpuOpts.Devices, cpuOpts.Envs)
	}
	var slotRec struct {
		ResourceName string `json:"resourceName"`
		AgentSlot    bool   `json:"agentSlot"`
	}
	slotRaw, err := tokenRecord(state, slot, "the agent slot", &slotRec)
	if err != nil || slotRec.ResourceName != agent || !slotRec.AgentSlot {
		fail("token record %s is not an agent slot of %s (%v)", slotRaw, agent, err)
	}
	waitCapacity(logger, m, agent, 100, 100, time.Second)
	fmt.Printf("ok  %s allocated to a CPU container: mount of %s and the slot's token (record: agent slot), no devices\n", agent, agentDir)

	// Health: the other GPU's device node disappears; allocatable drops.
	other, otherNode := gpu1, "dev/nvidia1"
	if visible == gpu1 {
		other, otherNode = gpu0, "dev/nvidia0"
	}
	if err := os.Remove(filepath.Join(host, otherNode)); err != nil {
		fail("%v", err)
	}
	took = waitCapacity(logger, m, gpu, 2, 1, 3*time.Second)
	fmt.Printf("ok  %s unhealthy -> allocatable 1 after %v\n", other, took.Round(time.Millisecond))
	write(host, otherNode, "")
	took = waitCapacity(logger, m, gpu, 2, 2, 3*time.Second)
	fmt.Printf("ok  %s healthy again -> allocatable 2 after %v\n", other, took.Round(time.Millisecond))

	// Kubelet restart: a new device manager wipes the socket directory and
	// serves kubelet.sock anew; the plugin must register again.
	if err := m.Stop(logger); err != nil {
		fail("device manager stop: %v", err)
	}
	m = startManager(logger, &pods)
	defer m.Stop(logger)
	took = waitCapacity(logger, m, gpu, 2, 2, 5*time.Second)
	waitCapacity(logger, m, rngd, 1, 1, 2*time.Second)
	fmt.Printf("ok  re-registered after the device manager restarted, in %v\n", took.Round(time.Millisecond))
	fmt.Println("PASS devicemanager-harness")
}
