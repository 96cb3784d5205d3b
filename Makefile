# polevpn developer targets.  Everything runs from the repo root.
#
#   make venv            create .venv and install polevpn (+ test extras)
#   make keys            create keys/ (CA, router cert, shared key) if missing; FORCE=1 regenerates
#   make keys GATEWAYS="169.254.0.1=198.18.10.0/24 ..." [CLIENT_CERTS=1]
#                        per-gateway secrets (and client certs), under the existing CA if any
#   make test            ruff + pytest (unit tests and netns end-to-end tests; needs root)
#   make demo            five-namespace demo using config.json / gateway.json / gateway/gateway-b.json
#   make bench           iperf3 plain routing vs. tunnel; writes docs/benchmarks.{md,json}
#   make attack          the attacks of issue 20 against a router process (root: a netns): does
#                        a gateway still connect, echo latency, RSS, CPU per attack MB; writes
#                        the attack section of docs/benchmarks.{md,json} (make bench runs it too)
#   make longhaul        kcp://, tls:// and OpenVPN on a 30 Mbit/s line with delay and loss
#                        (issue 16): iperf3 per sender congestion control, ping under load,
#                        two gateways sharing the line, docs/longhaul.png; writes the long-haul
#                        section of docs/benchmarks.{md,json} (make bench runs it too);
#                        REPEAT=3 for medians of three runs per cell
#   make soak            1000 gateway connect/disconnect cycles per transport against a router
#                        process, its RSS growth and fds; writes docs/soak.json and the soak
#                        section of docs/benchmarks.md
#   make screenshot      docs/dashboard.png: the router's web dashboard in headless chromium, with
#                        two gateways passing traffic (tests/test_dashboard.py; root)
#   make bench-etcd      the etcd client of the router cluster: our JSON-gateway client against
#                        aetcd (gRPC); writes the etcd client section of docs/benchmarks.md (root)
#   make cluster-bench   the router cluster (issue 17): failover of a dual-homed office, throughput
#                        across routers against within one, one router against two, 2000
#                        gateways; writes the cluster section of docs/benchmarks.md (root;
#                        make bench runs it too)
#   make direct-bench    direct office-to-office paths through NAT (issue 18): ping p50/p99 and
#                        iperf3 hostA -> hostB direct against relayed in one run, the router's
#                        CPU and bytes; writes the direct section of docs/benchmarks.md (root;
#                        make bench runs it too)
#   make lint            ruff only
#   make clean           remove .venv, caches and build artefacts (keeps keys/)

SHELL      := /bin/bash
PYTHON     ?= python3
VENV       := .venv
VPY        := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
KEYS_DIR   := keys
# Extra subjectAltNames for the router certificate (DNS polevpn-router, localhost,
# 127.0.0.1 and ::1 are always included by polevpn-keygen).
SAN        ?= 198.19.0.1 198.19.0.5
SAN_ARGS   := $(foreach s,$(SAN),--san $(s))
FORCE      ?=
# Per-gateway credentials: space-separated ADDR=NET[,NET...] specs for polevpn-keygen --gateway;
# CLIENT_CERTS=1 also issues each a client certificate.
GATEWAYS   ?=
CLIENT_CERTS ?=
# Runs per cell of the long-haul table (make longhaul, make bench): the median is reported.
REPEAT     ?= 1
GW_ARGS    := $(foreach g,$(GATEWAYS),--gateway $(g)) \
              $(if $(filter-out 0,$(CLIENT_CERTS)),--client-certs)
KEYGEN     := $(VENV)/bin/polevpn-keygen

# command -> Debian package, installed only when the command is missing.
SYSDEPS    := ip:iproute2 iperf3:iperf3 ping:iputils-ping nft:nftables \
              chromium:chromium chromedriver:chromium-driver openvpn:openvpn \
              etcd:etcd-server

.PHONY: all venv sysdeps keys test demo bench bench-etcd cluster-bench direct-bench attack \
        longhaul soak \
        screenshot lint clean

all: test

venv: $(STAMP) sysdeps

$(STAMP): setup.cfg pyproject.toml setup.py $(wildcard polevpn/kcp/*.c polevpn/kcp/vendor/kcp/*)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

sysdeps:
	@missing=""; \
	for pair in $(SYSDEPS); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	fi

keys: $(STAMP)
	@if [ -n "$(FORCE)" ] || [ ! -f $(KEYS_DIR)/ca.crt ]; then \
	  echo "$(KEYGEN) --out $(KEYS_DIR) $(SAN_ARGS) $(strip $(GW_ARGS)) $(if $(FORCE),--force)"; \
	  $(KEYGEN) --out $(KEYS_DIR) $(SAN_ARGS) $(GW_ARGS) $(if $(FORCE),--force); \
	elif [ -n "$(strip $(GATEWAYS))" ]; then \
	  echo "$(KEYGEN) --out $(KEYS_DIR) $(strip $(GW_ARGS))"; \
	  $(KEYGEN) --out $(KEYS_DIR) $(GW_ARGS); \
	else \
	  echo "$(KEYS_DIR)/ca.crt exists; use 'make keys FORCE=1' to regenerate," \
	    "or GATEWAYS=... to add gateways"; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check polevpn tests

test: venv
	$(VENV)/bin/ruff check polevpn tests
	$(VENV)/bin/pytest -q -rs

demo: venv keys
	$(VPY) tests/demo.py

bench: venv keys
	$(VPY) tests/bench.py --longhaul-repeat $(REPEAT)

bench-etcd: venv
	$(VPY) tests/bench_etcd.py

cluster-bench: venv
	$(VPY) tests/bench_cluster.py

direct-bench: venv
	$(VPY) tests/bench_direct.py

attack: venv
	$(VPY) tests/bench_attack.py

longhaul: venv
	$(VPY) tests/bench_longhaul.py --repeat $(REPEAT)

soak: venv keys
	$(VPY) tests/soak.py

screenshot: venv
	POLEVPN_DASHBOARD_SCREENSHOT=$(CURDIR)/docs/dashboard.png $(VENV)/bin/pytest -q -rs \
	  tests/test_dashboard.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
