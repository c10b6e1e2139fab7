# Shared by run-dev.sh (`make run`) and run-cluster.sh (`make cluster`):
# process bookkeeping, waiting for ports, Redis and the workers. Sourced,
# not run; expects to be in the repository root.

mkdir -p .run
bin="target/debug"

# Which application to run: APP=bank (the default) or APP=shop. Its
# binaries are <prefix>-command, <prefix>-projector, <prefix>-snapshotter
# and the CLI <cli>. One NATS/Redis setup serves one application at a time
# (the event stream is shared; each app's projections read only its own
# aggregate types).
app="${APP:-bank}"
case "$app" in
  bank) prefix="jetsource" cli="jetsource" workers=(command projector snapshotter gateway process) ;;
  shop) prefix="shop" cli="shop" workers=(command projector snapshotter gateway process) ;;
  *)
    echo "unknown APP=$app: use APP=bank (the default) or APP=shop" >&2
    exit 1
    ;;
esac
pids=()
stop() {
  trap - INT TERM EXIT
  echo "stopping (${pids[*]:-})" >&2
  # Newest first: the workers finish with NATS and Redis still up, then
  # the servers stop.
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
}
trap 'stop; exit 0' INT TERM
trap stop EXIT

# Waits until the nats-servers monitored on the given HTTP ports answer
# /healthz?js-server-only=true with 200 (JetStream up; in a cluster, a meta
# leader elected; not every stream: one that failed to recover is the
# workers' to report, not a reason to wait here).
healthy() {
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'GET /healthz?js-server-only=true HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
  local status
  read -r _ status _ <&3 || true
  exec 3<&-
  [ "$status" = 200 ]
}
wait_healthy() {
  local port all
  for _ in $(seq 1 300); do
    all=1
    for port in "$@"; do healthy "$port" 2>/dev/null || all=0; done
    [ "$all" = 1 ] && return 0
    sleep 0.1
  done
  echo "nats-server not healthy after 30 s (monitoring ports $*)" >&2
  return 1
}

# Refuses to start over servers that are already running.
ports_free() {
  local port
  for port in "$@"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "port $port is already in use: stop the other nats-server or redis-server first" >&2
      exit 1
    fi
  done
}

# TLS and authorization on, as in production (docs/SECURITY.md, docs/TLS.md):
# on first use this generates, into .run/ (private, mode 0600):
# - tls/: a development CA and a certificate for 127.0.0.1/localhost that
#   nats-server (clients and routes) and redis-server serve;
# - a random password per NATS role (client, command, projector,
#   snapshotter, admin, gateway, process; nats/accounts.conf) and per Redis user (projector
#   and admin write the read models, query only reads them).
# On every start it renders .run/nats-accounts.conf (the passwords as
# variables, then nats/accounts.conf), which nats/dev.conf and
# nats/cluster/n*.conf include, and .run/<role>.env: everything a process of
# that role needs (`source` it to act as that role). `rm -r .run/tls
# .run/*.env .run/*.secret` makes new ones; `make clean-data` deletes all.
roles=(client command projector snapshotter admin gateway process)
random_password() {
  local password
  password="$(LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c 32 || true)"
  [ "${#password}" -eq 32 ] || { echo "cannot read /dev/urandom" >&2; exit 1; }
  printf '%s' "$password"
}

# A secret kept in .run/<name>.secret, made on first use.
secret() {
  if [ ! -s ".run/$1.secret" ]; then
    (umask 077 && random_password >".run/$1.secret")
  fi
  cat ".run/$1.secret"
}

ensure_certificates() {
  [ -s .run/tls/ca.pem ] && [ -s .run/tls/server.pem ] && [ -s .run/tls/server-key.pem ] && return 0
  command -v openssl >/dev/null || { echo "openssl is missing: run \`make setup\`" >&2; exit 1; }
  (
    umask 077
    mkdir -p .run/tls
    cd .run/tls
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
    openssl req -x509 "${ec[@]}" -keyout ca-key.pem -out ca.pem -days 825 \
      -subj "/CN=jetsource development CA" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req "${ec[@]}" -keyout server-key.pem -out server.csr -subj "/CN=localhost" 2>/dev/null
    # serverAuth for clients, clientAuth too: cluster nodes present it to
    # each other on their routes.
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" \
      "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth,clientAuth" >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
      -days 825 -extfile server.ext -out server.pem 2>/dev/null
    rm -f server.csr server.ext ca.srl
  )
  echo "generated a development CA and server certificate in .run/tls" >&2
}

# The development signing key (docs/ARCHITECTURE.md, "Tamper evidence"):
# .run/keys/dev-1.key signs every event the command and process workers
# append; every role trusts .run/keys/*.pub. Made once, with openssl (the
# same PKCS#8 and SubjectPublicKeyInfo PEM files `jetsource keygen` writes).
ensure_signing_key() {
  [ -s .run/keys/dev-1.key ] && [ -s .run/keys/dev-1.pub ] && return 0
  (
    umask 077
    mkdir -p .run/keys
    openssl genpkey -algorithm ed25519 -out .run/keys/dev-1.key 2>/dev/null
    openssl pkey -in .run/keys/dev-1.key -pubout -out .run/keys/dev-1.pub 2>/dev/null
  )
  echo "generated a development signing key in .run/keys" >&2
}

# ensure_credentials <nats urls> <replicas>: the secrets, the server's
# accounts and each role's .run/<role>.env for servers at <nats urls>
# (tls://...) keeping streams at <replicas>.
ensure_credentials() {
  local urls="$1" replicas="$2" role variable ca
  ca="$(pwd)/.run/tls/ca.pem"
  ensure_signing_key
  (
    umask 077
    {
      echo "# Generated by scripts/dev-lib.sh from .run/*.secret and nats/accounts.conf: do not edit."
      for role in "${roles[@]}"; do
        variable="JETSOURCE_$(tr 'a-z' 'A-Z' <<<"$role")_PASSWORD"
        printf '%s: "%s"\n' "$variable" "$(secret "nats-$role")"
      done
      cat nats/accounts.conf
    } >.run/nats-accounts.conf.tmp
    mv .run/nats-accounts.conf.tmp .run/nats-accounts.conf
    for role in "${roles[@]}"; do
      {
        cat <<ENV
# jetsource development settings, role $role (generated by make run or make
# cluster on every start; docs/SECURITY.md). Use: source .run/$role.env
export JETSOURCE__NATS__USER=$role
export JETSOURCE__NATS__PASSWORD=$(secret "nats-$role")
export JETSOURCE__NATS__URL=$urls
export JETSOURCE__NATS__TLS_CA_FILE=$ca
export JETSOURCE__STORE__REPLICAS=$replicas
export JETSOURCE__STORE__TRUSTED_KEYS=$(pwd)/.run/keys
ENV
        case "$role" in
          command | process)
            echo "export JETSOURCE__STORE__SIGNING_KEY=$(pwd)/.run/keys/dev-1.key"
            ;;
        esac
        # Redis: the projector writes the read models and answers queries
        # as the read-only query user; admin (projection status, rebuilds)
        # has its own user with the projector's rights.
        case "$role" in
          projector | admin)
            cat <<ENV
export JETSOURCE__REDIS__URL=rediss://$role:$(secret "redis-$role")@127.0.0.1:6379/
export JETSOURCE__REDIS__QUERY_URL=rediss://query:$(secret redis-query)@127.0.0.1:6379/
export JETSOURCE__REDIS__TLS_CA_FILE=$ca
ENV
            ;;
          gateway)
            # The HTTP API on 127.0.0.1:8080 with one admin API key
            # (.run/gateway-key.secret; only its hash is configured), the
            # query user for projection status, admin's for replays.
            cat <<ENV
export JETSOURCE__GATEWAY__LISTEN=127.0.0.1:8080
export JETSOURCE__GATEWAY__API_KEYS=admin=$(printf %s "$(secret gateway-key)" | sha256sum | cut -d' ' -f1)
export JETSOURCE__REDIS__URL=rediss://admin:$(secret redis-admin)@127.0.0.1:6379/
export JETSOURCE__REDIS__QUERY_URL=rediss://query:$(secret redis-query)@127.0.0.1:6379/
export JETSOURCE__REDIS__TLS_CA_FILE=$ca
ENV
            ;;
        esac
      } >".run/$role.env.tmp"
      mv ".run/$role.env.tmp" ".run/$role.env"
    done
  )
}

# Read models live in memory only: if Redis restarts empty, the projector
# notices and rebuilds them from the event stream. TLS only, and ACL users
# as deploy/ ships them: nobody by default, projector (and admin) write
# jetsource's keys, query only reads them.
start_redis() {
  local acl=.run/redis-users.acl
  # deploy/systemd's ACL file with this machine's passwords, and an admin
  # user with the projector's rights for the CLI's operator commands.
  (
    umask 077
    awk -v p="$(secret redis-projector)" -v q="$(secret redis-query)" -v a="$(secret redis-admin)" '
      $1 == "user" && $2 == "projector" {
        admin = $0
        sub(/>REPLACE-ME/, ">" p); print
        sub(/^user projector /, "user admin ", admin); sub(/>REPLACE-ME/, ">" a, admin); print admin
        next
      }
      $1 == "user" && $2 == "query" { sub(/>REPLACE-ME/, ">" q); print; next }
      { print }' deploy/systemd/redis-users.acl.example >"$acl"
  )
  redis-server --bind 127.0.0.1 --port 0 --tls-port 6379 \
    --tls-cert-file .run/tls/server.pem --tls-key-file .run/tls/server-key.pem \
    --tls-ca-cert-file .run/tls/ca.pem --tls-auth-clients no \
    --aclfile "$(pwd)/$acl" --save "" --appendonly no \
    > >(sed -u 's/^/[redis] /' >&2) 2>&1 &
  pids+=($!)
  # A PING over TLS as the query user, not a bare TCP probe (which Redis
  # would log as a failed TLS handshake).
  for _ in $(seq 1 100); do
    if redis-cli --tls --cacert .run/tls/ca.pem -h 127.0.0.1 -p 6379 --user query \
      --pass "$(secret redis-query)" --no-auth-warning ping 2>/dev/null | grep -q PONG; then
      return 0
    fi
    sleep 0.1
  done
  echo "redis-server does not answer on 127.0.0.1:6379 after 10 s" >&2
  return 1
}

# The app's workers (with the process worker: the bank's loyalty process,
# the shop's fulfilment), each with its own role's settings.
start_workers() {
  local role
  for role in "${workers[@]}"; do
    if [ ! -x "$bin/$prefix-$role" ]; then
      echo "$bin/$prefix-$role is not built: run \`cargo build --workspace --bins\`" >&2
      exit 1
    fi
  done
  for role in "${workers[@]}"; do
    # A subshell that execs the worker: $! is the worker's own PID.
    (
      source ".run/$role.env"
      exec "$bin/$prefix-$role"
    ) &
    pids+=($!)
  done
}

# What to try in another terminal, for the app that runs: send and query as
# the client role, the operator commands as admin.
print_examples() {
  echo "  console: http://127.0.0.1:8080/console#key=$(secret gateway-key)"
  echo "  API:     curl -H \"Authorization: Bearer \$(cat .run/gateway-key.secret)\" http://127.0.0.1:8080/v1/queries"
  echo "  source .run/client.env    # role client: send and query, nothing else"
  case "$app" in
    bank)
      cat <<MSG
  $bin/$cli send account acc-1 OpenAccount '{"owner":"ada"}'
  $bin/$cli send account acc-1 Deposit '{"amount":100}'
  $bin/$cli query account acc-1
MSG
      ;;
    shop)
      cat <<MSG
  $bin/$cli send item tea AddItem '{"name":"Green tea"}'
  $bin/$cli send item tea Restock '{"quantity":10}'
  $bin/$cli send order o-1 PlaceOrder '{"customer":"ada","lines":[{"sku":"tea","quantity":2,"price":150}]}'
  $bin/$cli send order o-1 Pay '{"amount":300}'
  $bin/$cli query order o-1
  $bin/$cli query orders.by_customer ada
  $bin/$cli query item tea
  $bin/$cli query items.low_stock
MSG
      ;;
  esac
  echo "  source .run/admin.env     # role admin: history, state, stream, projection, dlq, snapshot"
  case "$app" in
    bank) echo "  $bin/$cli history account acc-1" ;;
    shop)
      echo "  $bin/$cli history order o-1"
      echo "  $bin/$cli state fulfilment o-1   # the process that reserved the tea and confirmed the order"
      ;;
  esac
  cat <<MSG
  $bin/$cli projection status
  $bin/$cli snapshot status
MSG
}
