// The architecture's dependency direction, checked in CI: lower layers never import higher ones.
// core <- ring, storage, metadata, rpc <- distributor <- volume <- nbd, aoe, http, csi <- server <- cli
const layers = ['core', 'ring|storage|metadata|rpc', 'distributor', 'volume', 'nbd|aoe|http|csi', 'server', 'cli'];
const forbidden = [];
layers.forEach((layer, i) => {
  const higher = layers.slice(i + 1).join('|');
  if (!higher) return;
  forbidden.push({
    name: `no-${layer.replace(/\|/g, '-')}-upward`,
    comment: `${layer} must not depend on ${higher}`,
    severity: 'error',
    from: { path: `^src/(${layer})/` },
    to: { path: `^src/(${higher})/` },
  });
});
forbidden.push({ name: 'no-circular', severity: 'error', from: {}, to: { circular: true } });
forbidden.push({ name: 'no-tests-in-src-imports', severity: 'error', from: { path: '^src/', pathNot: '\\.test\\.ts$' }, to: { path: '(\\.test\\.ts$|^test/)' } });
module.exports = {
  forbidden,
  options: {
    doNotFollow: { path: 'node_modules' },
    tsConfig: { fileName: 'tsconfig.json' },
    tsPreCompilationDeps: true,
    exclude: { path: '\\.test\\.ts$' },
  },
};
