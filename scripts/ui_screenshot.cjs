// Screenshots of a sweep in the MLflow UI for the README (docs/*.png). Not part of the platform or its
// tests: needs Debian's chromium and `npm install playwright-core` in the folder it runs from.
//   node scripts/ui_screenshot.cjs http://127.0.0.1:5000 EXPERIMENT_ID SWEEP_NAME TRIAL_RUN_ID... OUT_DIR
const { chromium } = require('playwright-core');

async function closeAssistant(page) {
  const close = page.locator('[aria-label="Close"]');
  for (let i = 0; i < await close.count(); i++) { try { await close.nth(i).click({ timeout: 1000 }); } catch (e) {} }
}

(async () => {
  const [base, exp, sweep, ...rest] = process.argv.slice(2);
  const out = rest.pop(), runs = rest;
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox',
    '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'] });
  const page = await browser.newPage({ viewport: { width: 1500, height: 760 } });
  // 1. the runs table: the sweep's parent run expanded to its nested trial runs
  const filter = encodeURIComponent(`tags.stence.sweep = '${sweep}'`);
  await page.goto(`${base}/#/experiments/${exp}/runs?searchFilter=${filter}`);
  await page.waitForTimeout(6000);
  await closeAssistant(page);
  try { await page.locator('button[data-component-id*="runnamecellrenderer"]').first().click({ timeout: 3000 }); }
  catch (e) { console.log('no nested runs to expand'); }
  await page.waitForTimeout(1500);
  await page.screenshot({ path: `${out}/mlflow_sweep_runs.png` });
  // 2. the trials compared: parallel coordinates of the swept values against the kNN validation AUROC
  await page.setViewportSize({ width: 1500, height: 640 });
  const q = `runs=${encodeURIComponent(JSON.stringify(runs))}&experiments=${encodeURIComponent(JSON.stringify([exp]))}`;
  await page.goto(`${base}/#/compare-runs?${q}`);
  await page.waitForTimeout(6000);
  await closeAssistant(page);
  try {
    const metrics = page.locator('.du-bois-light-select-multiple').nth(1);  // [0] parameters, [1] metrics
    await metrics.locator('.du-bois-light-select-selection-item-remove').first().click({ timeout: 2000 });
    await metrics.locator('input').click({ force: true });
    await page.keyboard.type('val/knn_auroc');
    await page.waitForTimeout(500);
    await page.keyboard.press('Enter');
    await page.keyboard.press('Escape');
  } catch (e) { console.log('metric selection:', e.message.split('\n')[0]); }
  await page.waitForTimeout(2000);
  await page.screenshot({ path: `${out}/mlflow_sweep_compare.png` });
  await browser.close();
})();
