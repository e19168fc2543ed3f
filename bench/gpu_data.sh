#!/usr/bin/env bash
# Carry the data set to the GPU machine: the bench suite's DATA folder (styles.csv, images-60x80.tar,
# images-224.tar: ~134 MiB) as parts small enough for one transfer each beside the project tree (the
# device tool carries at most 64 MiB per command, tree included).
#
#   bash bench/gpu_data.sh DATA            # here, in the checkout that the device tool sends
#
# writes .gpu/D1, .gpu/D2, ... (PART_BYTES each, default 50 MB; .gpu/ is kept out of git; STAGE_DIR
# names another folder than .gpu). On the GPU
# machine, one command per part, each with that part carried, in any order, back to back (an idle machine
# is given back after ~30 s):
#
#   bash .gpu/Dk/stage.sh
#
# Each copies its part to /tmp/flparts; the one that completes the set unpacks it into DEST (default
# /tmp/fldata), checks it against the checksums taken here and prints `data ready in DEST`.
set -euo pipefail
[ $# -eq 1 ] || { sed -n 2,15p "$0"; exit 2; }
data=$(realpath "$1")
files=(styles.csv images-60x80.tar images-224.tar)
for f in "${files[@]}"; do [ -f "$data/$f" ] || { echo "no $data/$f" >&2; exit 2; }; done
if [ -z "${STAGE_DIR:-}" ]; then
  root=$(git rev-parse --show-toplevel)
  grep -qx '/.gpu/' "$root/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$root/.git/info/exclude"
  STAGE_DIR=$root/.gpu
fi
mkdir -p "$STAGE_DIR" && cd "$STAGE_DIR"
rm -rf D[0-9]* data.part.*
(cd "$data" && sha256sum "${files[@]}") > data.sha256
# One stream of the three files (already compressed JPEGs: no gzip), cut into parts of PART_BYTES.
tar -cf - -C "$data" "${files[@]}" | split -b "${PART_BYTES:-50000000}" -d -a 2 - data.part.
parts=(data.part.*)
k=0
for part in "${parts[@]}"; do
  k=$((k + 1))
  mkdir -p "D$k"
  mv "$part" "D$k/"
  cp data.sha256 "D$k/"
  cat > "D$k/stage.sh" <<EOF
#!/usr/bin/env bash
# Part $k of ${#parts[@]} of the bench data set: copy it aside; with every part there, unpack and check.
set -euo pipefail
here=\$(dirname "\$0")
stage=\${STAGE:-/tmp/flparts} dest=\${DEST:-/tmp/fldata}
mkdir -p "\$stage" "\$dest"
cp "\$here"/data.part.* "\$here/data.sha256" "\$stage/"
have=\$(ls "\$stage"/data.part.* | wc -l)
if [ "\$have" -lt ${#parts[@]} ]; then echo "part $k staged: \$have of ${#parts[@]} parts in \$stage"; exit 0; fi
cat "\$stage"/data.part.* | tar -xf - -C "\$dest"
(cd "\$dest" && sha256sum --quiet -c "\$stage/data.sha256")
rm -f "\$stage"/data.part.*
echo "data ready in \$dest: \$(ls "\$dest" | tr '\n' ' ')"
EOF
  chmod +x "D$k/stage.sh"
done
rm -f data.sha256
du -sh "$STAGE_DIR"/D*
echo "${#parts[@]} parts; on the GPU machine: bash .gpu/Dk/stage.sh with .gpu/Dk carried, one per command"
