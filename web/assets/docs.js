// Renders /openapi.yaml with Redoc (a classic script: the page's CSP allows
// no inline scripts).
/* global Redoc */
Redoc.init('/openapi.yaml', {
  hideDownloadButton: false,
  expandResponses: '200,201',
  jsonSampleExpandLevel: 3,
  pathInMiddlePanel: true,
  scrollYOffset: '.docs-bar',
  theme: {
    colors: { primary: { main: '#4f46e5' } },
    typography: {
      fontFamily: 'system-ui, -apple-system, "Segoe UI", Roboto, sans-serif',
      headings: { fontFamily: 'system-ui, -apple-system, "Segoe UI", Roboto, sans-serif' },
      code: { fontFamily: 'ui-monospace, SFMono-Regular, Menlo, Consolas, monospace' },
    },
    sidebar: { width: '280px' },
  },
}, document.getElementById('redoc'), (err) => {
  if (err) {
    const p = document.createElement('p');
    p.className = 'docs-error';
    p.textContent = 'Could not render the API reference: ' + (err.message || err);
    document.body.append(p);
  }
});
