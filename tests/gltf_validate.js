// Validate glTF/GLB files with the Khronos validator (the npm package has no CLI).
// Usage: node tests/gltf_validate.js FILE...  -> one JSON line per file on stdout:
//   {"file", "numErrors", "numWarnings", "numInfos", "numHints", "errors": [codes]}
// Exit status: 0 if no file has errors, 1 if some do, 2 on bad usage or a validator crash.
'use strict';
const fs = require('fs');
const validator = require('gltf-validator');

async function main(files) {
  if (files.length === 0) {
    console.error('usage: node gltf_validate.js FILE...');
    return 2;
  }
  let failed = false;
  for (const f of files) {
    const report = await validator.validateBytes(new Uint8Array(fs.readFileSync(f)), { maxIssues: 100 });
    const issues = report.issues;
    const errors = issues.messages.filter((m) => m.severity === 0).map((m) => m.code);
    console.log(JSON.stringify({
      file: f, numErrors: issues.numErrors, numWarnings: issues.numWarnings,
      numInfos: issues.numInfos, numHints: issues.numHints, errors: [...new Set(errors)],
    }));
    if (issues.numErrors > 0) failed = true;
  }
  return failed ? 1 : 0;
}

main(process.argv.slice(2)).then((code) => process.exit(code), (err) => {
  console.error(String(err && err.stack ? err.stack : err));
  process.exit(2);
});
