#!/bin/sh
# A hostile guest agent for fleet's tests (never shipped in an image fleet builds for use):
# it takes the place of fleet-agent in a test image and speaks the agent protocol badly on
# purpose. It injects output, a prompt, artifacts and an exit into another VM's run (its name
# comes from the kernel command line, fleet.victim=), churns its boot id, floods its own run
# with output, prompts and artifacts (a giant offset, more files than allowed), and finally
# stops reading, so the host's writes back up.
for d in /sys/class/virtio-ports/*; do
  [ "$(cat "$d/name" 2>/dev/null)" = org.fleet.agent.0 ] && port=/dev/$(basename "$d")
done
[ -n "$port" ] || { echo "hostile: no port" > /dev/console; exit 1; }
victim=$(sed -n 's/.*fleet\.victim=\([^ ]*\).*/\1/p' /proc/cmdline)
exec 3<>"$port"
say() { printf '%s\n' "$1" >&3; }
note() { echo "hostile: $*" > /dev/console; }

say '{"type":"hello","v":1,"agentVersion":"hostile","bootId":"hostile-boot-0"}'
note "greeted; victim run $victim"

# Learn its own run from the host's RunTask.
own=""
while [ -z "$own" ] && read -r line <&3; do
  case "$line" in
    *'"type":"runTask"'*) own=$(echo "$line" | sed -n 's/.*"task":"\([^"]*\)".*/\1/p') ;;
  esac
done
note "own run $own"

# 1. Another VM's run: output, a prompt, an artifact and a successful exit.
s=1
while [ $s -le 20 ]; do
  say "{\"type\":\"output\",\"v\":1,\"task\":\"$victim\",\"seq\":$s,\"data\":\"injected by another VM\\n\"}"
  s=$((s + 1))
done
say "{\"type\":\"prompt\",\"v\":1,\"task\":\"$victim\",\"seq\":21,\"text\":\"forged? (y/n)\",\"screen\":[\"forged\"]}"
say "{\"type\":\"artifact\",\"v\":1,\"task\":\"$victim\",\"seq\":22,\"path\":\"evil.bin\",\"offset\":0,\"data\":\"ZXZpbA==\",\"last\":true}"
say "{\"type\":\"exit\",\"v\":1,\"task\":\"$victim\",\"seq\":23,\"code\":0,\"reason\":\"completed\"}"
note "injected into $victim"

# 2. A new boot id in every hello.
i=1
while [ $i -le 30 ]; do
  say "{\"type\":\"hello\",\"v\":1,\"agentVersion\":\"hostile\",\"bootId\":\"hostile-boot-$i\"}"
  i=$((i + 1))
done
say '{"type":"hello","v":1,"agentVersion":"hostile","bootId":"hostile-boot-0"}'

# 3. Its own run: 96 MiB of output in 512 KiB chunks (the host keeps 64 MiB).
chunk=$(head -c 524288 /dev/zero | tr '\0' x)
s=1
while [ $s -le 192 ]; do
  printf '{"type":"output","v":1,"task":"%s","seq":%d,"data":"%s"}\n' "$own" "$s" "$chunk" >&3
  s=$((s + 1))
done
note "output flood sent"

# 4. An artifact part at offset 2^43 (a sparse 8 TiB file), then more files than allowed.
say "{\"type\":\"artifact\",\"v\":1,\"task\":\"$own\",\"seq\":$s,\"path\":\"sparse.bin\",\"offset\":8796093022208,\"data\":\"aGk=\",\"last\":false}"
s=$((s + 1))
i=1
while [ $i -le 1100 ]; do
  say "{\"type\":\"artifact\",\"v\":1,\"task\":\"$own\",\"seq\":$s,\"path\":\"many/$i\",\"offset\":0,\"data\":\"aGk=\",\"last\":false}"
  s=$((s + 1)); i=$((i + 1))
done
note "artifact flood sent"

# 5. Prompts: 150 of 200 KiB each (the host keeps 100 of 4 KiB). A prompt waits for an
# answer before the next counts, so output between them withdraws each.
text=$(head -c 204800 /dev/zero | tr '\0' q)
i=1
while [ $i -le 150 ]; do
  printf '{"type":"prompt","v":1,"task":"%s","seq":%d,"text":"%s?","screen":["%s"]}\n' "$own" "$s" "$text" "$text" >&3
  s=$((s + 1))
  say "{\"type\":\"output\",\"v\":1,\"task\":\"$own\",\"seq\":$s,\"data\":\"x\"}"
  s=$((s + 1)); i=$((i + 1))
done
note "prompt flood sent"

# 6. Stop reading: whatever the host writes now backs up.
note "done; not reading any more"
while :; do sleep 3600; done
