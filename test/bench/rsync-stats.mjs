/** What `rsync --stats` says it moved, parsed from its output (run it with LC_ALL=C: plain digits and commas). */

const FIELDS = {
  sent: /^Total bytes sent: ([\d,]+)/m,
  received: /^Total bytes received: ([\d,]+)/m,
  literal: /^Literal data: ([\d,]+) bytes/m,
  matched: /^Matched data: ([\d,]+) bytes/m,
  fileSize: /^Total file size: ([\d,]+) bytes/m,
};

/** `{ sent, received, literal, matched, fileSize }` in bytes; fails naming the first field it cannot find. */
export function parseRsyncStats(text) {
  const out = {};
  for (const [key, pattern] of Object.entries(FIELDS)) {
    const match = pattern.exec(text);
    if (!match) throw new Error(`rsync --stats output has no ${pattern.source.slice(1).split(":")[0]} line:\n${text}`);
    out[key] = Number(match[1].replaceAll(",", ""));
  }
  return out;
}
