// Role assignments in the app's resource group, as in the samples' app/rbac.bicep: data roles on the storage
// account for the app (and the deploying user), Monitoring Metrics Publisher on Application Insights, EventGrid
// Data Sender on the run-events topic, and write access to the dead-letter container for the Event Grid system
// topics' identities.
@description('Name of the data storage account.')
param storageAccountName string

@description('Name of the Application Insights component.')
param appInsightsName string

@description('Container Event Grid dead-letters into.')
param deadLetterContainerName string

@description('Name of the run-events topic the app publishes to.')
param runEventsTopicName string

@description('Principal id of the app\'s user-assigned identity.')
param managedIdentityPrincipalId string

@description('Principal id of the deploying user; empty = no user roles.')
param userIdentityPrincipalId string = ''

@allowed([
  'User'
  'ServicePrincipal'
])
@description('Kind of principal that userIdentityPrincipalId is.')
param userPrincipalType string = 'User'

@description('Principal ids of the Event Grid topics (the system topics, the run-events topic) that dead-letter into deadLetterContainerName.')
param eventGridPrincipalIds array = []

var blobDataOwnerRoleId = 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b' // Storage Blob Data Owner
var blobDataContributorRoleId = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe' // Storage Blob Data Contributor
var queueDataContributorRoleId = '974c5e8b-45b9-4653-ba55-5f855dd0fb88' // Storage Queue Data Contributor
var tableDataContributorRoleId = '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3' // Storage Table Data Contributor
var metricsPublisherRoleId = '3913510d-42f4-4e42-8a64-420c390055eb' // Monitoring Metrics Publisher
var eventGridDataSenderRoleId = 'd5a91429-5739-47e2-a06b-3470a27159e7' // EventGrid Data Sender

// Blob: host, deployment package, datasets and reports. Queue: the host's blob-trigger bookkeeping.
// Table: the run ledger, audit and usage tables.
var storageRoleIds = [
  blobDataOwnerRoleId
  queueDataContributorRoleId
  tableDataContributorRoleId
]

resource storageAccount 'Microsoft.Storage/storageAccounts@2022-09-01' existing = {
  name: storageAccountName

  resource blobService 'blobServices' existing = {
    name: 'default'

    resource deadLetterContainer 'containers' existing = {
      name: deadLetterContainerName
    }
  }
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource runEventsTopic 'Microsoft.EventGrid/topics@2025-02-15' existing = {
  name: runEventsTopicName
}

resource appStorageRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for roleId in storageRoleIds: {
  name: guid(storageAccount.id, managedIdentityPrincipalId, roleId)
  scope: storageAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)
    principalId: managedIdentityPrincipalId
    principalType: 'ServicePrincipal'
  }
}]

resource userStorageRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for roleId in storageRoleIds: if (!empty(userIdentityPrincipalId)) {
  name: guid(storageAccount.id, userIdentityPrincipalId, roleId)
  scope: storageAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)
    principalId: userIdentityPrincipalId
    principalType: userPrincipalType
  }
}]

resource appMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(applicationInsights.id, managedIdentityPrincipalId, metricsPublisherRoleId)
  scope: applicationInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', metricsPublisherRoleId)
    principalId: managedIdentityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource deadLetterWriters 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for topicPrincipalId in eventGridPrincipalIds: {
  name: guid(storageAccount::blobService::deadLetterContainer.id, topicPrincipalId, blobDataContributorRoleId)
  scope: storageAccount::blobService::deadLetterContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', blobDataContributorRoleId)
    principalId: topicPrincipalId
    principalType: 'ServicePrincipal'
  }
}]

// Publishing run events: the topic has local auth disabled, so this role is the only way in.
resource appRunEventsSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(runEventsTopic.id, managedIdentityPrincipalId, eventGridDataSenderRoleId)
  scope: runEventsTopic
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', eventGridDataSenderRoleId)
    principalId: managedIdentityPrincipalId
    principalType: 'ServicePrincipal'
  }
}
