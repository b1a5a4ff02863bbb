#!/bin/bash
# bashecho: answers every request line with the same line (DROP sync protocol). An encoded
# newline ("\tncm\t") passes through unchanged, so multi-line payloads round-trip as well.
while IFS= read -r line; do
    printf '%s\n' "$line"
done
