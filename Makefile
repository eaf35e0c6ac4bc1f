# The single entry point. `make test` works on a fresh machine: it builds the virtual environments first.
SHELL := /bin/bash
PY312 := /root/.pyenv/versions/3.12.1/bin/python3.12
PYTHON ?= $(shell if [ -x $(PY312) ]; then echo $(PY312); elif command -v python3.12 >/dev/null; then echo python3.12; else echo python3; fi)
VENV := .venv
SAM_VENV := .venv-sam
CHECKOV_VENV := .venv-checkov
PIP_FLAGS := --quiet --disable-pip-version-check
export SAM_CLI_TELEMETRY := 0
# Only the targets that run on this machine (moto, the emulator) default the region; the operator targets
# (connections, authorize-url, refresh, ...) use your own AWS configuration, profile region included.
test bench soak explore demo local lint: export AWS_DEFAULT_REGION ?= us-east-1
export SAM_CLI := $(CURDIR)/$(SAM_VENV)/bin/sam

CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test lint build clean deps chromium local demo bench soak explore connections connection-add connection-grant connection-revoke-access jwt-certificate stage-jwt-key retire-jwt-key servicenow-client authorize-url refresh revoke stage-secret smoke

deps: $(VENV)/.installed $(SAM_VENV)/.installed

$(VENV)/.installed: requirements-dev.txt src/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -r requirements-dev.txt
	touch $@

$(CHECKOV_VENV)/.installed: requirements-checkov.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install $(PIP_FLAGS) -r requirements-checkov.txt
	touch $@

$(SAM_VENV)/.installed: requirements-sam.txt
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install $(PIP_FLAGS) -r requirements-sam.txt
	touch $@

test: deps chromium ## the whole suite: unit, integration (moto server + emulator), browser, template checks
	$(VENV)/bin/python -m pytest

# The browser tests drive the system Chromium; Playwright's own browser download is never used.
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium; \
	fi

RUN := PYTHONPATH=src:. $(VENV)/bin/python
ADMIN := $(RUN) -m admin

bench: deps ## cold start, sweep cost, throughput, fan-out, failure cost, package size -> benchmarks/RESULTS.md
	$(RUN) -m benchmarks.run

soak: deps ## the life-cycle model for 100,000+ generated steps (STEPS=) -> soak section of benchmarks/RESULTS.md
	$(RUN) -m benchmarks.soak $(if $(STEPS),--steps $(STEPS))

explore: deps ## every interleaving of two writers of one connection within BOUND= (2) deviations -> RESULTS.md
	$(RUN) -m benchmarks.explore --bound $(or $(BOUND),2) --results

demo: $(VENV)/.installed ## one connection's whole life on this machine: consent, tokens stored, refreshed
	$(RUN) -m local.demo

connections: $(VENV)/.installed ## list connections: status and expiries, never tokens
	$(ADMIN) connections list

connection-add: $(VENV)/.installed ## CONNECTION=, INSTANCE=, CLIENT_ID=, optional GRANT=, USERNAME=, SCOPE=, APPFLOW=, JWT_SUBJECT=, JWT_KEY_ID=, JWT_KMS_KEY=, STACK=
	$(ADMIN) connections add "$(CONNECTION)" --instance-url "$(INSTANCE)" --client-id "$(CLIENT_ID)" \
		$(if $(GRANT),--grant-type "$(GRANT)") $(if $(USERNAME),--username "$(USERNAME)") $(if $(SCOPE),--scope "$(SCOPE)") \
		$(if $(APPFLOW),--appflow-profile "$(APPFLOW)") $(if $(JWT_SUBJECT),--jwt-subject "$(JWT_SUBJECT)") \
		$(if $(JWT_KEY_ID),--jwt-key-id "$(JWT_KEY_ID)") $(if $(JWT_KMS_KEY),--jwt-kms-key "$(JWT_KMS_KEY)") \
		$(if $(STACK),--stack "$(STACK)")

connection-grant: $(VENV)/.installed ## CONNECTION=, PRINCIPAL= (account id or role ARN): let it read the connection's secret
	$(ADMIN) connections grant "$(CONNECTION)" "$(PRINCIPAL)"

connection-revoke-access: $(VENV)/.installed ## CONNECTION=, PRINCIPAL=: take that reader's access away
	$(ADMIN) connections revoke-access "$(CONNECTION)" "$(PRINCIPAL)"

jwt-certificate: $(VENV)/.installed ## CONNECTION=, NEXT=1 for the staged key: the PEM certificate to upload to ServiceNow
	$(ADMIN) jwt-certificate "$(CONNECTION)" $(if $(NEXT),--next)

stage-jwt-key: $(VENV)/.installed ## CONNECTION=, JWT_KEY_ID=, JWT_KMS_KEY=: stage the next signing key (rollover)
	$(ADMIN) connections stage-jwt-key "$(CONNECTION)" --jwt-key-id "$(JWT_KEY_ID)" --jwt-kms-key "$(JWT_KMS_KEY)"

authorize-url: $(VENV)/.installed ## CONNECTION=, and STACK= (deployed) or SERVICENOW_OAUTH_API_URL in the environment
	$(ADMIN) authorize-url "$(CONNECTION)" $(if $(STACK),--stack "$(STACK)")

refresh: $(VENV)/.installed ## CONNECTION=, FORCE=1 to refresh a token that is not due
	$(ADMIN) refresh "$(CONNECTION)" $(if $(FORCE),--force)

servicenow-client: $(VENV)/.installed ## CONNECTION=, INSTANCE=, STACK= (or SERVICENOW_OAUTH_API_URL); GRANT=jwt_bearer JWT_SUBJECT= JWT_KEY_ID=, ENTRY= or ADOPT=NAME, TRUST=, ACCESS_LIFESPAN=, REFRESH_LIFESPAN=: register the OAuth client in ServiceNow (admin asked at a prompt)
	$(ADMIN) servicenow-client "$(CONNECTION)" $(if $(INSTANCE),--instance-url "$(INSTANCE)") $(if $(STACK),--stack "$(STACK)") \
		$(if $(GRANT),--grant-type "$(GRANT)") $(if $(JWT_SUBJECT),--jwt-subject "$(JWT_SUBJECT)") \
		$(if $(JWT_KEY_ID),--jwt-key-id "$(JWT_KEY_ID)") $(if $(JWT_KMS_KEY),--jwt-kms-key "$(JWT_KMS_KEY)") \
		$(if $(ADOPT),--adopt "$(ADOPT)") $(if $(ENTRY),--entry-name "$(ENTRY)") $(if $(ACCESS_LIFESPAN),--access-lifespan "$(ACCESS_LIFESPAN)") \
		$(if $(REFRESH_LIFESPAN),--refresh-lifespan "$(REFRESH_LIFESPAN)") $(if $(TRUST),--trust "$(TRUST)")

retire-jwt-key: $(VENV)/.installed ## CONNECTION=: promote the staged JWT key now; remove the other keys' verifier maps
	$(ADMIN) connections retire-jwt-key "$(CONNECTION)"

stage-secret: $(VENV)/.installed ## CONNECTION=; prompts for the new client secret (rollover)
	$(ADMIN) connections stage-secret "$(CONNECTION)"

smoke: $(VENV)/.installed ## STACK=: check a deployed stack (outputs, callback page, one sweep, a test alarm)
	$(ADMIN) smoke --stack "$(STACK)"

revoke: $(VENV)/.installed ## CONNECTION=
	$(ADMIN) revoke "$(CONNECTION)"

local: $(VENV)/.installed ## the whole system on this machine: moto, ServiceNow emulator, the API; Ctrl-C stops it
	PYTHONPATH=src:. $(VENV)/bin/python -m local.stack

lint: deps $(CHECKOV_VENV)/.installed ## ruff, mypy (strict on src/core), cfn-lint on the SAM-translated template, checkov
	$(VENV)/bin/ruff check src local admin tests benchmarks
	$(VENV)/bin/ruff format --check src local admin tests benchmarks
	$(VENV)/bin/mypy
	$(RUN) -m local.template_check
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download --framework cloudformation -f template.yaml

build: $(SAM_VENV)/.installed ## sam build, then bytecode compiled in (Lambda cannot write it: a cold start would compile)
	PATH="$(dir $(PYTHON)):$$PATH" $(SAM_CLI) build --template template.yaml
	$(PYTHON) -m compileall -q -j 0 --invalidation-mode unchecked-hash .aws-sam/build

clean:
	rm -rf $(VENV) $(SAM_VENV) $(CHECKOV_VENV) .aws-sam test-artifacts
